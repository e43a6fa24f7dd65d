"""What many test files need: requests as a client makes them, waiting for a condition, reading
an error, counting the simulators' calls. One copy here; test files import from it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, OTHER_CLIENT_KEY, RunningProxy, Sims
from openai_spec import validate_error

from proxy.errors import Kind, ProxyError
from proxy.server import free_port as free_port  # for the tests, with the rest of their helpers

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


def chat(client: openai.OpenAI, content: str = "你好", model: str = "gpt-4o-mini", **extra: Any) -> str:
    """A chat through the SDK; the simulators answer with `content` at the end."""
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **extra)
    text = reply.choices[0].message.content
    assert text is not None and text.endswith(content), text
    return text


def post_chat(url: str, content: str = "你好", model: str = "gpt-4o-mini", key: str = CLIENT_KEY,
              headers: dict[str, str] | None = None, timeout: float = 30, **extra: Any) -> httpx.Response:
    """A chat as raw HTTP to the proxy at `url`, whatever the answer."""
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      headers={"authorization": f"Bearer {key}", **(headers or {})},
                      json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def post_image(url: str, prompt: str = "一只橘猫", model: str = "gpt-image-2", headers: dict[str, str] | None = None,
               timeout: float = 30, **extra: Any) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", headers={**AUTH, **(headers or {})},
                      json={"model": model, "prompt": prompt, **extra}, timeout=timeout)


def image_burst(proxy: RunningProxy, count: int, model: str = "fengyuan/image_generation",
                prompt: str = "cat") -> list[Any]:
    """`count` image requests at once through the async SDK: each answer, or the error it raised."""
    async def run() -> list[Any]:
        async with proxy.async_client(timeout=60) as client:
            return await asyncio.gather(*(client.images.generate(model=model, prompt=f"{prompt} {i}",
                                                                 response_format="url")
                                          for i in range(count)), return_exceptions=True)

    return asyncio.run(run())


def error_of(reply: httpx.Response, status: int = 400) -> dict[str, Any]:
    """The OpenAI-shaped error of an answer that must have `status`."""
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    validate_error(body)
    return body["error"]  # type: ignore[no-any-return]


def sdk_error(exc_class: type[openai.APIStatusError], call: Callable[[], Any]) -> openai.APIStatusError:
    """Run an SDK call that must fail with `exc_class`; check the parts every error shares."""
    with pytest.raises(exc_class) as caught:
        call()
    exc = caught.value
    assert isinstance(exc.body, dict), exc.body
    validate_error({"error": exc.body})
    assert exc.response.headers["x-request-id"].startswith("req_")
    assert exc.response.headers["content-type"].startswith("application/json")
    return exc


def sdk_error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    """The OpenAI-shaped error the SDK raised `exc` for, as it came on the wire."""
    body = exc.response.json()
    validate_error(body)
    return body["error"]  # type: ignore[no-any-return]


def refusal(call: Callable[..., Any], *args: Any) -> tuple[Kind, str, float | None]:
    """What the proxy's own code raises for `call(*args)`: kind, message and retry-after."""
    with pytest.raises(ProxyError) as caught:
        call(*args)
    return caught.value.kind, caught.value.message, caught.value.retry_after


def task_ids(reply: httpx.Response) -> list[str]:
    return [t for t in reply.headers.get("x-proxy-task-ids", "").split(",") if t]


def fast_tasks(config: dict[str, Any], sims: Sims, task_seconds: float = 0.05, poll_interval: float = 0.05,
               timeout: float = 10) -> None:
    """Short simulated tasks, polled often: image tests stay quick."""
    config["tasks"] = {"poll_interval": poll_interval, "first_poll": 0.05, "timeout": timeout}
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = task_seconds


def in_background(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """`work` on a thread of its own; its result or error lands in the box."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # reported by the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def most_in_any_window(times: list[float], window: float) -> int:
    """The most of `times` that fall in any one stretch of `window` seconds."""
    times = sorted(times)
    best, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def key_fingerprint(secret: str) -> str:
    """A key's name in logs and admin pages, written out here rather than taken from the proxy."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def calls_by_key(sim: Any, endpoint: str, since: int = 0) -> dict[str | None, int]:
    """How many calls of `endpoint` each upstream key made (from the simulator's call log)."""
    counts: dict[str | None, int] = {}
    for call in list(sim.calls)[since:]:
        if call.endpoint == endpoint:
            counts[call.key] = counts.get(call.key, 0) + 1
    return counts


# ---- the admin API -----------------------------------------------------------------------------


def with_admin(config: dict[str, Any]) -> dict[str, Any]:
    config["admin"] = {"keys": [ADMIN_KEY]}
    return config


def admin_request(target: RunningProxy | str, method: str, path: str, key: str | None = ADMIN_KEY,
                  **params: Any) -> httpx.Response:
    """An admin call to a proxy (or its URL) with `key`, or none; whatever the answer."""
    url = target if isinstance(target, str) else target.url
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{url}{path}", params=params, headers=headers, timeout=10)


def admin_get(target: RunningProxy | str, path: str, **params: Any) -> httpx.Response:
    reply = admin_request(target, "GET", path, **params)
    assert reply.status_code == 200, reply.text
    return reply


def admin_keys(target: RunningProxy | str, provider: str | None = None) -> dict[str, dict[str, Any]]:
    """GET /admin/keys, by fingerprint (of one provider's keys if named)."""
    return {view["fingerprint"]: view for view in admin_get(target, "/admin/keys").json()["data"]
            if provider is None or view["provider"] == provider}


def usage_report(target: RunningProxy | str, **params: Any) -> dict[str, Any]:
    """GET /admin/usage as JSON."""
    return admin_get(target, "/admin/usage", **params).json()  # type: ignore[no-any-return]


def one_call_at_a_time(config: dict[str, Any], secret: str, queue_timeout: float) -> None:
    """xffuw down to one key that takes one call at a time, others waiting up to `queue_timeout`."""
    xffuw = config["providers"]["xffuw"]
    del xffuw["keys"]
    xffuw["key"] = [{"value": secret, "max_concurrent": 1}]
    xffuw["queue_timeout"] = queue_timeout


def call_in_flight(proxy: RunningProxy, secret: str,
                   work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """`work` started in the background, returned once the proxy has a call on `secret` in flight."""
    thread, box = in_background(work)
    wait_until(lambda: admin_keys(proxy)[key_fingerprint(secret)]["in_flight"] == 1, what="the call in flight")
    return thread, box


# ---- raw servers of a test's own --------------------------------------------------------------


class LoopbackServer:
    """An asyncio server on 127.0.0.1 (a free port); `serve` handles each connection. Leaving the
    `async with` cancels the connections still open: a test's end ends them all."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl = ssl_context
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._track, "127.0.0.1", 0, ssl=self.ssl)
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


# ---- small ASGI upstreams of a test's own ----------------------------------------------------


async def asgi_request(scope: dict[str, Any], receive: Callable[..., Any],
                       send: Callable[..., Any]) -> tuple[str, bytes] | None:
    """An HTTP request's bearer key and body; None for the lifespan, served here until shutdown."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return None
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    return headers.get("authorization", "").removeprefix("Bearer ").strip(), body


async def send_json(send: Callable[..., Any], payload: Any, status: int = 200,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


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
