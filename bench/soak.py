"""Soak test: many OpenAI clients (httpx), 5 % injected upstream faults, deliberate disconnects,
one SIGTERM and restart of the proxy; then every upstream task matched against the proxy's
store, each invariant printed PASS / FAIL, exit 1 when one fails (bench/README.md, "The soak").

    .venv/bin/python bench/soak.py [--clients 300] [--seconds 120] [--quick] [--keep]
"""

# ruff: noqa: UP013
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Required, TypedDict

import httpx
import msgspec
from lib import BENCH
from lib.procs import Procs, interrupt_on_signals, raise_nofile, status_kb
from lib.targets import start_proxy
from soak_sims import FENGYUAN_KEYS, XFFUW_KEYS

from proxy.server import free_port

HOST = "127.0.0.1"
CHAT_PREFIX = "你好!我是 AI 助手。You said: "  # what the simulated xffuw chat answers
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLIENT_NAMES = 20  # proxy clients (keys); soak client i uses key i % CLIENT_NAMES


@dataclass
class Settings:
    clients: int = 300
    seconds: float = 120.0
    keep: bool = False
    seed: int = 7
    fault_rate: float = 0.05
    think: tuple[float, float] = (0.3, 1.5)  # pause between two operations of one client
    task_delay: tuple[float, float] = (0.5, 4.0)  # how long an upstream task takes
    request_timeout: float = 60.0  # a client's patience when it does not hang up on purpose
    settle: float = 60.0  # after `seconds`: time for retries in progress to get an answer
    drain: float = 45.0  # then: time for the proxy's unfinished tasks to become final
    poll_fail_seconds: float = 4.0
    shutdown_grace: float = 3.0
    task_timeout: float = 30.0


QUICK: dict[str, Any] = {"clients": 40, "seconds": 16.0, "think": (0.2, 0.8), "task_delay": (0.3, 3.5),
                         "request_timeout": 20.0, "settle": 12.0, "drain": 15.0, "poll_fail_seconds": 2.5,
                         "shutdown_grace": 2.0, "task_timeout": 15.0}


def soak_proxy_config(s: Settings, port: int, sims: dict[str, str], db: Path,
                      clients: dict[str, str]) -> dict[str, Any]:
    limits = {"connect_timeout": 2.0, "read_timeout": 15.0, "rpm": 1000000}
    return {"server": {"host": HOST, "port": port, "shutdown_grace": s.shutdown_grace},
            "clients": [{"name": name, "key": key} for name, key in clients.items()],
            "providers": {"xffuw": {"base_url": sims["xffuw"] + "/api/v1/", "keys": XFFUW_KEYS, **limits},
                          "fengyuan": {"base_url": sims["fengyuan"], "keys": FENGYUAN_KEYS, **limits}},
            "tasks": {"poll_interval": 0.5, "first_poll": 0.25, "timeout": s.task_timeout, "keep_results": 1.0},
            "images": {"download_timeout": 10.0}, "log": {"level": "info", "format": "json"},
            "storage": {"path": str(db)}, "aliases": {"dall-e-3": "xffuw/gpt-image-2"}}


# ---- what the clients saw ---------------------------------------------------------------


@dataclass
class Answer:
    """One request as its client saw it: outcome ok | error | malformed | none (no answer)."""

    op: str = ""
    outcome: str = "none"
    status: int = 0
    reason: str = ""  # none: the exception; malformed: what was wrong; error: the error code
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    raw: bytes = b""
    request_id: str | None = None
    started: float = 0.0
    ended: float = 0.0
    deliberate: bool = False  # the client hung up on purpose
    idem: str | None = None

    def malformed(self, problem: str | None) -> None:
        if problem:
            self.outcome, self.reason = "malformed", problem

    @property
    def message(self) -> str:
        return self.body["error"]["message"] if self.outcome == "error" else ""


@dataclass
class ImageOp:
    client: str
    idem: str
    n: int
    fmt: str
    attempts: list[Answer] = field(default_factory=list)
    final: Answer | None = None


# The answers' shapes, one line each (the functional TypedDict syntax; ruff's UP013 is off in this file)
Error = TypedDict("Error", {"message": str, "type": str, "param": str | None, "code": str | None})
Message = TypedDict("Message", {"role": Literal["assistant"], "content": str})
Choice = TypedDict("Choice", {"index": Literal[0], "message": Message, "finish_reason": Literal["stop"]})
ErrorBody = TypedDict("ErrorBody", {"error": Error})
Usage = TypedDict("Usage", {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int})
Completion = TypedDict("Completion", {"id": str, "object": Literal["chat.completion"], "created": int, "model": str,
                                      "choices": list[Choice], "usage": Usage})
Url = TypedDict("Url", {"url": str})
Images = TypedDict("Images", {"created": int, "data": list[dict[str, Any]]})
TaskView = TypedDict("TaskView", {
    "id": Required[str], "object": Required[Literal["proxy.task"]], "error": Error | None, "data": list[Url],
    "status": Required[Literal["pending", "running", "succeeded", "failed", "timeout"]]}, total=False)


def shape(value: Any, expected: Any) -> str | None:
    """None when `value` has the `expected` shape (a TypedDict), else what is wrong with it."""
    try:
        msgspec.convert(value, expected)
    except msgspec.ValidationError as error:
        return str(error)
    return None


def error_shape(body: Any) -> str | None:
    """None when the body is OpenAI's error shape, else what is wrong with it."""
    problem = shape(body, ErrorBody)
    return problem or (None if body["error"]["message"] else "error.message is empty")


def check_chat(body: Any, prompt: str, model: str) -> str | None:
    if problem := shape(body, Completion):
        return problem
    if not body["id"].startswith("chatcmpl-") or body["model"] != model or len(body["choices"]) != 1:
        return "id, model or the number of choices wrong"
    content = body["choices"][0]["message"]["content"]
    return None if content == CHAT_PREFIX + prompt else f"content is not the upstream's answer: {content!r}"


def check_stream(raw: bytes, prompt: str, model: str, include_usage: bool) -> str | None:
    blocks = [b.strip() for b in raw.decode("utf-8", "replace").split("\n\n") if b.strip()]
    if bad := next((b for b in blocks if not b.startswith("data: ")), None):
        return f"not an SSE data line: {bad[:80]!r}"
    events = [b[len("data: "):] for b in blocks]
    if not events or events[-1] != "[DONE]":
        return "the stream does not end with data: [DONE]"
    content, finish, usage_seen, role_seen = [], None, False, False
    for text in events[:-1]:
        try:
            chunk = json.loads(text)
        except ValueError:
            return f"a data line is not JSON: {text[:80]!r}"
        if isinstance(chunk, dict) and "error" in chunk:
            problem = error_shape(chunk)
            return f"in-stream error not OpenAI-shaped: {problem}" if problem else "in-stream error (n=1)"
        if not isinstance(chunk, dict) or chunk.get("object") != "chat.completion.chunk" or chunk.get("model") != model:
            return "a chunk is not a chat.completion.chunk"
        if not chunk.get("choices"):
            usage_seen = isinstance(chunk.get("usage"), dict)
            continue
        delta = chunk["choices"][0].get("delta") or {}
        role_seen = role_seen or delta.get("role") == "assistant"
        content.append(delta.get("content") or "")
        finish = chunk["choices"][0].get("finish_reason") or finish
    if "".join(content) != CHAT_PREFIX + prompt:
        return "streamed content is not the upstream's answer"
    if not role_seen or finish != "stop":
        return "no role chunk or no finish_reason stop"
    return "include_usage asked, no usage chunk" if include_usage and not usage_seen else None


def check_images(body: Any, n: int, fmt: str) -> str | None:
    if problem := shape(body, Images):
        return problem
    if len(body["data"]) != n:
        return f"data is not a list of {n}"
    for item in body["data"]:
        if fmt == "b64_json":
            try:
                if not base64.b64decode(item.get("b64_json") or "", validate=True).startswith(PNG_MAGIC):
                    return "b64_json is not a PNG"
            except ValueError:
                return "b64_json is not base64"
        elif not str(url := item.get("url")).startswith(f"http://{HOST}:") or "/files/" not in str(url):
            return f"url is not a result URL: {url!r}"
    return None


def check_task_view(body: Any, task_id: str) -> str | None:
    if problem := shape(body, TaskView):
        return problem
    if body["id"] != task_id:
        return "not a proxy.task for this id"
    if body["status"] == "succeeded" and not body.get("data"):
        return "succeeded without a result URL"
    if body["status"] in ("failed", "timeout") and error_shape({"error": body.get("error")}) is not None:
        return "a failed task without an OpenAI-shaped error"
    return None


# ---- the load ---------------------------------------------------------------------------


class Soak:
    """The clients, and what they saw."""

    def __init__(self, s: Settings, base: str, keys: dict[str, str]) -> None:
        self.s, self.base, self.keys, self.t0 = s, base, list(keys.items()), time.monotonic()
        self.end, self.settle_end = self.t0 + s.seconds, self.t0 + s.seconds + s.settle
        self.attempts: list[Answer] = []
        self.malformed: list[str] = []
        self.inconsistent: list[str] = []
        self.unanswered_ops: list[str] = []
        self.failed_without_ids: list[str] = []
        self.image_ops: dict[str, ImageOp] = {}
        self.ops: Counter[str] = Counter()
        self.task_checks = 0

    def add(self, op: str, answer: Answer, *, deliberate: bool = False, idem: str | None = None) -> Answer:
        answer.op, answer.deliberate, answer.idem = op, deliberate, idem
        self.attempts.append(answer)
        if answer.outcome == "malformed":
            self.malformed.append(f"{op} HTTP {answer.status}: {answer.reason}: {answer.raw[:300]!r}")
        return answer

    async def send(self, http: httpx.AsyncClient, method: str, path: str, *, key: str, body: Any = None,
                   idem: str | None = None, timeout: float, stream: bool = False) -> Answer:  # noqa: ASYNC109
        headers = {"authorization": f"Bearer {key}", **({"idempotency-key": idem} if idem else {})}
        answer = Answer(started=time.monotonic())
        try:
            reply = await http.send(http.build_request(method, path, json=body, headers=headers, timeout=timeout),
                                    stream=stream)
            try:
                answer.raw = await asyncio.wait_for(reply.aread(), timeout) if stream else reply.content
            finally:
                await reply.aclose()
            answer.status, answer.headers = reply.status_code, {k.lower(): v for k, v in reply.headers.items()}
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            answer.reason = type(exc).__name__
        answer.ended, content_type = time.monotonic(), answer.headers.get("content-type", "")
        if answer.reason:
            return answer
        answer.request_id = answer.headers.get("x-request-id")
        if not answer.request_id:
            answer.malformed("no x-request-id header")
        elif 200 <= answer.status < 300:
            answer.outcome = "ok"
            try:
                answer.body = None if "text/event-stream" in content_type else json.loads(answer.raw)
            except ValueError:
                answer.malformed("2xx body is not JSON")
        else:
            try:
                answer.body = json.loads(answer.raw)
            except ValueError:
                answer.body = None
            problem = error_shape(answer.body)
            if problem is not None or "application/json" not in content_type:
                answer.malformed(problem or f"error with content-type {content_type!r}")
            else:
                answer.outcome, answer.reason = "error", str(answer.body["error"]["code"])
        return answer

    async def client(self, index: int) -> None:
        rng = random.Random(self.s.seed * 100_003 + index)
        name, key = self.keys[index % len(self.keys)]
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)
        async with httpx.AsyncClient(base_url=self.base, limits=limits, trust_env=False) as http:
            await asyncio.sleep(rng.uniform(0, 1.5))  # stagger the start
            while time.monotonic() < self.end:
                roll = rng.random()
                try:
                    if roll < 0.50:
                        await self.chat(http, rng, key, stream=roll >= 0.30)
                    else:
                        await self.images(http, rng, key, name, "xffuw" if roll < 0.75 else "fengyuan")
                except Exception as exc:  # a bug in this script must not hide as a client hang
                    self.malformed.append(f"soak client error {exc!r}")
                    raise
                await asyncio.sleep(rng.uniform(*self.s.think))

    async def chat(self, http: httpx.AsyncClient, rng: random.Random, key: str, *, stream: bool) -> None:
        op = "chat.stream" if stream else "chat"
        self.ops[op] += 1
        deliberate = rng.random() < 0.08
        model = rng.choice(["gpt-4o-mini", "deepseek-chat", "xffuw/gpt-4o-mini"])
        prompt = f"soak {uuid.uuid4().hex[:12]} 你好" + (" [delay=1]" if deliberate else "")  # slow, to hang up on
        include_usage = stream and rng.random() < 0.5
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                                **({"stream": True} if stream else {}),
                                **({"stream_options": {"include_usage": True}} if include_usage else {})}
        idem = uuid.uuid4().hex if rng.random() < 0.3 else None
        timeout = rng.uniform(0.2, 0.6) if deliberate else self.s.request_timeout
        while True:
            answer = await self.send(http, "POST", "/v1/chat/completions", key=key, body=body, idem=idem,
                                     timeout=timeout, stream=stream)
            if answer.outcome == "ok":
                answer.malformed((check_stream(answer.raw, prompt, model, include_usage) or (
                    None if "text/event-stream" in answer.headers.get("content-type", "")
                    else "a stream without text/event-stream")) if stream else check_chat(answer.body, prompt, model))
            self.add(op, answer, deliberate=deliberate, idem=idem)
            if answer.outcome != "none" or deliberate:
                return
            if time.monotonic() > self.settle_end:
                self.unanswered_ops.append(f"{op} {idem or ''}: {answer.reason}")
                return
            await asyncio.sleep(rng.uniform(0.3, 0.8))  # the proxy restarting: try again

    async def images(self, http: httpx.AsyncClient, rng: random.Random, key: str, name: str, upstream: str) -> None:
        op = f"images.{upstream}"
        self.ops[op] += 1
        n = 2 if rng.random() < 0.25 else 1
        fmt = "b64_json" if rng.random() < 0.2 else "url"
        markers = f"[delay={rng.uniform(*self.s.task_delay):.2f}]" + (" [fail]" if rng.random() < 0.05 else "")
        if upstream == "xffuw":
            model = rng.choice(["gpt-image-2", "dall-e-3", "xffuw/gpt-image-2", "gpt-image-2", "flux-schnell"])
        else:
            model, markers = "fengyuan/image_generation", "[instant]" if rng.random() < 0.1 else markers
        body: dict[str, Any] = {"model": model, "prompt": f"soak {uuid.uuid4().hex[:12]} 一只橘猫 {markers}", "n": n}
        if fmt == "b64_json" or "gpt-image-" in model:  # gpt-image-* answers b64_json unless asked for URLs
            body["response_format"] = fmt
        if rng.random() < 0.3:
            body["size"] = rng.choice(["1024x1024", "1536x1024", "1024x1536"])
        idem = uuid.uuid4().hex
        image_op = self.image_ops[idem] = ImageOp(name, idem, n, fmt)
        deliberate = rng.random() < 0.15
        while True:
            first = not image_op.attempts
            answer = await self.send(http, "POST", "/v1/images/generations", key=key, body=body, idem=idem,
                                     timeout=rng.uniform(0.2, 1.2) if deliberate and first else self.s.request_timeout)
            if answer.outcome == "ok":
                answer.malformed(check_images(answer.body, n, fmt))
            image_op.attempts.append(self.add(op, answer, deliberate=deliberate and first, idem=idem))
            # Like the SDKs: try again with the same key after no answer, a 409 in progress, or a
            # 500/503/504 (unless x-should-retry: false). Other answers are final.
            if not (answer.outcome == "none" or answer.reason == "idempotency_key_in_progress" or (
                    answer.status in (500, 503, 504) and answer.headers.get("x-should-retry") != "false")):
                break
            if time.monotonic() > self.settle_end:
                self.unanswered_ops.append(f"{op} {idem}: {answer.reason}")
                return
            wait = float(answer.headers.get("retry-after", 0) or 0) if answer.outcome == "error" else 0.0
            await asyncio.sleep(max(wait, rng.uniform(0.5, 2.0) if answer.deliberate else rng.uniform(0.3, 0.8)))
        image_op.final = answer
        ids = [t for t in answer.headers.get("x-proxy-task-ids", "").split(",") if t]
        if answer.outcome == "ok" and len(ids) != n:
            self.inconsistent.append(f"{idem}: 200 with {len(ids)} task ids for n={n}")
        await self.check_tasks(http, key, image_op, answer, ids)
        if answer.outcome == "ok" and rng.random() < 0.08:
            await self.replay(http, rng, key, image_op, body, answer, op)

    async def view(self, http: httpx.AsyncClient, key: str, task_id: str, op: str, timeout: float) -> Answer:  # noqa: ASYNC109
        """GET /v1/tasks/{id}, its body checked."""
        view = await self.send(http, "GET", f"/v1/tasks/{task_id}", key=key, timeout=timeout)
        if view.outcome == "ok":
            view.malformed(check_task_view(view.body, task_id))
        return self.add(op, view)

    async def check_tasks(self, http: httpx.AsyncClient, key: str, image_op: ImageOp, answer: Answer,
                          ids: list[str]) -> None:
        """Every task the answer names is retrievable, final, and agrees with the answer."""
        states, urls, idem = [], [], image_op.idem
        for task_id in ids:
            view = await self.view(http, key, task_id, "tasks.get", self.s.request_timeout)
            self.task_checks += 1
            if view.outcome == "none":
                return  # the proxy is restarting; the final sweep checks this task again
            if view.outcome != "ok":
                self.inconsistent.append(f"{idem}: GET /v1/tasks/{task_id} answered {view.status} {view.reason}")
                return
            states.append(view.body["status"])
            urls += [d["url"] for d in view.body.get("data", [])]
        if answer.outcome == "ok":
            got = [d.get("url") for d in answer.body["data"]]
            if any(s != "succeeded" for s in states):
                self.inconsistent.append(f"{idem}: answered 200 but tasks are {states}")
            elif image_op.fmt == "url" and urls != got:
                self.inconsistent.append(f"{idem}: answer urls {got} != task urls {urls}")
        elif answer.reason == "upstream_task_failed" and not ids:
            self.failed_without_ids.append(f"{idem}: {answer.message}")
        elif answer.reason == "upstream_task_failed" and "failed" not in states:
            self.inconsistent.append(f"{idem}: upstream_task_failed but tasks are {states}")

    async def replay(self, http: httpx.AsyncClient, rng: random.Random, key: str, image_op: ImageOp,
                     body: dict[str, Any], first: Answer, op: str) -> None:
        """The same key again: the same body replays the answer; another body is a 409."""
        same = rng.random() < 0.5
        again = await self.send(http, "POST", "/v1/images/generations", key=key, idem=image_op.idem,
                                body=body if same else {**body, "prompt": body["prompt"] + " (changed)"},
                                timeout=self.s.request_timeout)
        self.add(op + (".replay" if same else ".reuse"), again, idem=image_op.idem)
        if same and again.outcome == "ok" and again.body != first.body:
            problem = "the replay answered another body"
        elif same and again.outcome == "error":
            problem = f"the replay answered {again.status} {again.reason}"
        elif not same and again.outcome != "none" and (again.status, again.reason) != (409, "idempotency_key_reused"):
            problem = f"another body with a used key answered {again.status} {again.reason}"
        else:
            return
        self.inconsistent.append(f"{image_op.idem}: {problem}")


# ---- the run ----------------------------------------------------------------------------


class ProxyProcess:
    """The proxy under test, restarted once on the same store; its memory sampled over its life."""

    def __init__(self, procs: Procs, config: dict[str, Any], logs: Path) -> None:
        self.procs, self.config, self.logs = procs, config, logs
        self.proc: Any = None  # subprocess.Popen[bytes]
        self.url = f"http://{HOST}:{config['server']['port']}"
        self.peak_kib: list[int] = []  # VmHWM, one per process started
        self.rss_kib: list[list[int]] = []  # VmRSS samples, one list per process started

    async def start(self) -> None:
        """Spawn it and wait for /healthz; the event loop (the clients) runs meanwhile."""
        self.peak_kib.append(0)
        self.rss_kib.append([])
        target, _ = await asyncio.get_running_loop().run_in_executor(
            None, start_proxy, self.procs, self.config, str(len(self.peak_kib)), 1, self.logs, 0.1)
        self.proc = target.proc

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_kib[-1] = max(self.peak_kib[-1], status_kb(self.proc.pid, "VmHWM"))
            if rss := status_kb(self.proc.pid, "VmRSS"):
                self.rss_kib[-1].append(rss)

    async def stop(self, grace: float) -> int:
        """SIGTERM, then wait for the exit; SIGKILL (a failure: -9) only if it overstays."""
        self.sample()
        code = await asyncio.get_running_loop().run_in_executor(None, self.procs.stop, self.proc, grace + 15)
        return -9 if code is None else code


async def start_sims(procs: Procs, logs: Path, s: Settings) -> dict[str, str]:
    with (logs / "sims.stdout").open("wb") as stdout:
        proc = procs.spawn([sys.executable, str(BENCH / "soak_sims.py"), "--fault-rate", str(s.fault_rate),
                            "--seed", str(s.seed)], logs / "sims.log", stdout=stdout)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the simulators exited at start; see {logs / 'sims.log'}")
        for line in (logs / "sims.stdout").read_text().splitlines():
            if line.startswith("READY "):
                return dict(json.loads(line[len("READY "):]))
        await asyncio.sleep(0.05)
    raise RuntimeError("the simulators did not start")


def read_tasks(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [msgspec.msgpack.decode(row[0]) for row in conn.execute("SELECT record FROM tasks").fetchall()]
    finally:
        conn.close()


def read_access_log(texts: list[str]) -> tuple[dict[str, int], Counter[str], list[str]]:
    """request_id -> status; counts of statuses; lines that show a crash or a traceback."""
    status_of: dict[str, int] = {}
    statuses: Counter[str] = Counter()
    crashes: list[str] = []
    for number, text in enumerate(texts, 1):
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Exception in ASGI" in line:
                    crashes.append(f"proxy-{number}.log: {line[:300]}")
                continue
            if isinstance(entry, dict) and entry.get("event") == "request":
                status_of[str(entry.get("request_id"))] = int(entry.get("status", 0))
                statuses[str(entry.get("status"))] += 1
            elif isinstance(entry, dict) and (entry.get("event") in (
                    "unhandled_error", "task_settle_failed", "store_write_failed") or
                    "Traceback" in str(entry.get("exception", ""))):
                crashes.append(f"proxy-{number}.log: {line[:400]}")
    return status_of, statuses, crashes


async def run(s: Settings) -> int:
    logs, procs, passed = Path(tempfile.mkdtemp(prefix="proxy-soak-")), Procs(), False
    try:
        passed = await load(s, logs, procs)
        return 0 if passed else 1
    except (RuntimeError, httpx.HTTPError, OSError) as error:  # a child died or never started
        traceback.print_exc()
        print(f"SOAK FAILED: the run broke off: {error!r}")
        return 2
    finally:
        procs.stop_all()
        if not s.keep and passed:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"logs, config and the proxy's store: {logs}")


async def load(s: Settings, logs: Path, procs: Procs) -> bool:
    """The clients against the proxy, the faults and the restart; the drain, every stored task read; the verdict."""
    wall, sims = time.monotonic(), await start_sims(procs, logs, s)
    clients = {f"soak-{i:02d}": f"sk-soak-{i:02d}-{secrets.token_hex(8)}" for i in range(CLIENT_NAMES)}
    db, restart_at, timeline = logs / "store" / "proxy.sqlite3", s.seconds / 2, dict[str, float]()
    proxy = ProxyProcess(procs, soak_proxy_config(s, free_port(), sims, db, clients), logs)
    await proxy.start()
    print(f"soak: {s.clients} clients for {s.seconds:g} s against {proxy.url} (upstream faults {s.fault_rate:.0%}, "
          f"one restart at {restart_at:g} s); logs in {logs}", flush=True)
    soak, exit_codes = Soak(s, proxy.url, clients), list[int]()

    async def control() -> None:
        async with httpx.AsyncClient(base_url=sims["control"], trust_env=False) as ctl:
            for at, what in sorted([(s.seconds * 0.2, "xffuw"), (s.seconds * 0.7, "fengyuan"),
                                    (restart_at, "restart")]):
                await asyncio.sleep(max(0.0, soak.t0 + at - time.monotonic()))
                if what != "restart":
                    await ctl.post("/poll-fail", params={"sim": what, "seconds": s.poll_fail_seconds})
                    continue
                timeline["sigterm"] = time.monotonic()
                exit_codes.append(await proxy.stop(s.shutdown_grace))
                timeline["exited"] = time.monotonic()
                await proxy.start()
                timeline["ready"] = time.monotonic()
                print(f"soak: restarted the proxy at {timeline['sigterm'] - soak.t0:.1f} s: exit code "
                      f"{exit_codes[-1]}, {timeline['exited'] - timeline['sigterm']:.1f} s to exit, "
                      f"{timeline['ready'] - timeline['exited']:.1f} s to serve again", flush=True)

    async def sampler() -> None:
        while True:
            proxy.sample()
            await asyncio.sleep(0.25)

    sampling, controller = asyncio.create_task(sampler()), asyncio.create_task(control())
    await asyncio.gather(*(soak.client(i) for i in range(s.clients)))
    await controller
    load_end, drain_deadline = time.monotonic(), time.monotonic() + s.drain
    # Drain: every task the proxy stored becomes final (the proxy keeps polling on its own).
    while time.monotonic() < drain_deadline:
        if not any(t["state"] in ("pending", "running") for t in read_tasks(db)):
            break
        await asyncio.sleep(0.5)
    # Every stored task, over the API, with its owner's key.
    tasks, views, sweep_problems, gate = read_tasks(db), dict[str, dict[str, Any]](), list[str](), asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=proxy.url, trust_env=False, limits=httpx.Limits(max_connections=20)) as http:
        async def fetch(task: dict[str, Any]) -> None:
            async with gate:
                view = await soak.view(http, clients[task["client"]], task["id"], "tasks.sweep", 30)
            if view.outcome == "ok":
                views[task["id"]] = view.body
            else:
                sweep_problems.append(f"GET /v1/tasks/{task['id']}: {view.status} {view.reason}")

        await asyncio.gather(*(fetch(t) for t in tasks))
    proxy.sample()
    sampling.cancel()
    async with httpx.AsyncClient(base_url=sims["control"], trust_env=False) as ctl:
        upstream = (await ctl.get("/state", timeout=30)).json()
    exit_codes.append(await proxy.stop(s.shutdown_grace))
    (logs / "upstream.json").write_text(json.dumps(upstream, ensure_ascii=False))
    with (logs / "attempts.jsonl").open("w") as out:  # what the clients saw, for a failed run's post-mortem
        for a in soak.attempts:
            seen = {k: v for k, v in vars(a).items() if k not in ("body", "raw")}
            out.write(json.dumps({**seen, "started": a.started - soak.t0, "ended": a.ended - soak.t0}) + "\n")
    proxy_logs = [path.read_text(errors="replace") for path in sorted(logs.glob("proxy-*.log"))]  # noqa: ASYNC240
    return verdict(s, soak, tasks, views, sweep_problems, upstream, proxy, proxy_logs, timeline, exit_codes,
                   time.monotonic() - wall, load_end)


def verdict(s: Settings, soak: Soak, tasks: list[dict[str, Any]], views: dict[str, dict[str, Any]],
            sweep_problems: list[str], upstream: dict[str, Any], proxy: ProxyProcess, proxy_logs: list[str],
            timeline: dict[str, float], exit_codes: list[int], wall: float, load_end: float) -> bool:
    """The invariants, from what the clients saw, the simulators did and the proxy stored; printed."""
    attempts, (status_of, statuses, crashes) = soak.attempts, read_access_log(proxy_logs)
    restart_window = (timeline.get("sigterm", 0) - 0.2, timeline.get("ready", 0) + 1.0)
    outcomes = Counter(a.outcome for a in attempts)
    errors = Counter(f"{a.status} {a.reason}" for a in attempts if a.outcome == "error")
    five_hundreds = [f"{a.op} {a.idem} HTTP {a.status}" for a in attempts
                     if a.status >= 500 and a.status not in (502, 503, 504)]
    no_answer: Counter[str] = Counter()
    unexpected_drops: list[str] = []
    for a in (a for a in attempts if a.outcome == "none"):
        if a.deliberate:
            no_answer["hung up on purpose"] += 1
        elif a.ended >= restart_window[0] and a.started <= restart_window[1]:
            no_answer[f"proxy restarting ({a.reason})"] += 1
        else:
            no_answer[f"unexpected ({a.reason})"] += 1
            unexpected_drops.append(f"{a.op} {a.reason} at {a.started - soak.t0:.1f}-{a.ended - soak.t0:.1f} s")

    # upstream tasks started, by the simulators' own account, against the proxy's store
    started = {(sim, entry["id"]): entry for sim in ("xffuw", "fengyuan") for entry in upstream[sim]["submits"]}
    known: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for task in tasks:
        upstream_id, url = task.get("upstream_task_id"), (task.get("urls") or [""])[0]
        if upstream_id or url:  # else it failed at submit: the upstream named no task; the proxy stored the failure
            # an instant xffuw result has no task id: it is in the file name
            upstream_id = upstream_id or (url.rsplit("/xf-", 1)[-1].split(".")[0] if "/xf-" in url else url)
            known[(task["upstream"], str(upstream_id))].append(task)
    retrievable = {k for k, ts in known.items() if any(views.get(t["id"], {}).get("status") in ("succeeded", "failed")
                                                      for t in ts)}
    reached_proxy = {k for k, e in started.items() if not e["dropped"]}
    dropped_at_submit = {k for k, e in started.items() if e["dropped"]}
    lost = sorted(reached_proxy - retrievable)
    phantom = sorted(k for k in known if k not in started)
    doubled = sorted(k for k, ts in known.items() if len(ts) > 1)
    not_final = [t["id"] for t in tasks if views.get(t["id"], {}).get("status") not in ("succeeded", "failed")]
    task_states = Counter(views.get(t["id"], {}).get("status", "not retrieved") for t in tasks)

    # Every answer names the tasks its request started (x-proxy-task-ids), errors included:
    # without the ids a client cannot fetch a paid result with GET /v1/tasks/{id}.
    started_by: dict[str, set[str]] = defaultdict(set)
    for task in (t for t in tasks if t.get("request_id")):
        started_by[task["request_id"]].add(task["id"])
    hidden_ids = []
    for a in attempts:
        named = {t for t in a.headers.get("x-proxy-task-ids", "").split(",") if t}
        if a.request_id and a.outcome in ("ok", "error") and not started_by.get(a.request_id, set()) <= named:
            hidden_ids.append(f"{a.op} {a.idem} answered {a.status} {a.message or a.reason!s} without naming tasks "
                              f"{sorted(started_by[a.request_id] - named)}")

    # Paid twice: a later submit under the same Idempotency-Key although an earlier round's
    # answer was kept (or never given): rounds are the request ids that stored tasks.
    rounds: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for task in (t for t in tasks if t.get("idempotency_key")):
        rounds[(task["client"], task["idempotency_key"])][task.get("request_id") or "?"].append(task)
    paid_twice = [f"{k} stored {len(known[k])} times" for k in doubled]
    repaid_after_error: Counter[str] = Counter()
    answer_of = {a.request_id: a for a in attempts if a.request_id}
    for (client, idem), by_request in rounds.items():
        n = soak.image_ops[idem].n if idem in soak.image_ops else 1
        for request_id, round_tasks in sorted(by_request.items(), key=lambda i: min(t["created"] for t in i[1]))[:-1]:
            seen, logged = answer_of.get(request_id), status_of.get(request_id)
            # A round may be followed by another only when its answer freed the key: one of its
            # submits failed, or it ended in an ordinary error (502/503/504 from the proxy's own
            # error handling, which keeps the key only for failed tasks). A 500 (the request
            # crashed or was cancelled) or a 200 frees nothing: another submit is paid twice.
            if len(round_tasks) != n:
                repaid_after_error["an earlier submit of the same request failed"] += 1
            elif logged not in (None, 200, 500) and not any(t["state"] == "failed" for t in round_tasks):
                said = f"{seen.status} {seen.message or seen.reason}" if seen is not None else \
                    f"nothing (hung up); proxy logged {logged}"
                repaid_after_error[f"the client got {said}"] += 1
            else:
                saw = f"{seen.outcome} {seen.status}" if seen is not None else "nothing"
                states = [t["state"] for t in round_tasks]
                paid_twice.append(f"client {client} key {idem}: round {request_id} (tasks {states}, client saw {saw}, "
                                  f"access log status {logged}) was followed by another submit")

    def same_tasks(ops: list[ImageOp]) -> str:
        """The paths the issue names: how many, answered later for the same key, from the first tasks."""
        answered = [op for op in ops if op.final is not None and op.final.outcome in ("ok", "error")]
        one_round = sum(len(rounds.get((op.client, op.idem), {})) <= 1 for op in answered)
        return f"{len(ops)} / {len(answered)} / {one_round}"

    # uvicorn re-raises SIGTERM after its graceful shutdown: -15 is a clean exit
    unclean = [f"exit code {c}" for c in exit_codes if c not in (0, -signal.SIGTERM)]
    must = {  # each invariant and what breaks it
        "malformed answers": soak.malformed,
        "500s from the proxy": five_hundreds,
        "upstream tasks started (answer reached the proxy) == delivered or retrievable":
            [f"lost {k}" for k in lost] + [f"phantom {k}" for k in phantom],
        "tasks the proxy stored that are not final and retrievable": [*not_final, *sweep_problems],
        "upstream tasks paid twice for one Idempotency-Key": paid_twice,
        "answers inconsistent with GET /v1/tasks or with the Idempotency-Key": soak.inconsistent,
        "answers naming every task their request started (x-proxy-task-ids)": hidden_ids,
        "operations without an answer by the end": soak.unanswered_ops,
        "connections dropped outside the restart": unexpected_drops,
        "crashes or tracebacks in the proxy's log": crashes,
        "proxy exits cleanly on SIGTERM": unclean,
    }

    def line(label: str, value: Any, rule: str = "") -> None:
        print(f"  {label:<78} {value}{'   (' + rule + ')' if rule else ''}")

    images = soak.image_ops.values()
    print(f"\n== soak: {s.clients} clients, {s.seconds:g} s of load, {wall:.0f} s in all "
          f"(load ended {load_end - soak.t0:.0f} s after start) ==")
    print("operations: " + ", ".join(f"{k} {v}" for k, v in sorted(soak.ops.items())))
    line("requests sent", len(attempts))
    line("answered well (2xx, valid body)", outcomes["ok"])
    line("answered with an OpenAI-shaped error", outcomes["error"])
    for what, count in errors.most_common():
        line(f"    {what}", count)
    line("malformed answers", len(soak.malformed), "must be 0")
    line("500s from the proxy", len(five_hundreds), "must be 0")
    line("no answer (connection closed / refused / timed out)", outcomes["none"])
    for what, count in no_answer.most_common():
        line(f"    {what}", count, "must be 0" if what.startswith("unexpected") else "")
    line("operations without an answer by the end", len(soak.unanswered_ops), "must be 0")
    line("task checks right after an answer (GET /v1/tasks/{id})", soak.task_checks)
    line("answers inconsistent with their tasks / Idempotency-Key", len(soak.inconsistent), "must be 0")
    line("answers that do not name the tasks their request started", len(hidden_ids), "must be 0")
    line("image requests hung up on purpose / answered later for the same key / from the first tasks",
         same_tasks([op for op in images if op.attempts and op.attempts[0].deliberate]))
    line("image requests cut by the restart / answered later for the same key / from the first tasks",
         same_tasks([op for op in images if any(a.outcome == "none" and not a.deliberate for a in op.attempts)]))
    line("answers replayed for an Idempotency-Key (idempotent-replayed: true)",
         sum(a.headers.get("idempotent-replayed") == "true" for a in attempts))
    line("upstream_task_failed answers naming no task (failed at submit, nothing stored)",
         len(soak.failed_without_ids))
    line("tasks resumed by the restarted proxy (task_resumed in its log)",
         sum(text.count('"task_resumed"') for text in proxy_logs))
    print("upstream tasks")
    line("started (answered submits: xffuw image.php + Fengyuan invoke)", f"{len(started)} (" + ", ".join(
        f"{sim} {len(upstream[sim]['submits'])}" for sim in ("xffuw", "fengyuan")) + ")")
    line("    of which the submit's answer was dropped by an injected fault", len(dropped_at_submit))
    line("    of which the answer reached the proxy", len(reached_proxy))
    line("stored by the proxy (SQLite tasks table)", f"{len(tasks)} ({dict(task_states)})")
    line("result delivered or retrievable (GET /v1/tasks/{id}: succeeded|failed)",
         len(reached_proxy & retrievable), f"must equal {len(reached_proxy)}")
    line("started, answer reached the proxy, but not retrievable", len(lost), "must be 0")
    line("stored tasks that match no upstream task", len(phantom), "must be 0")
    line("stored tasks not final or not retrievable after the drain", len(not_final) + len(sweep_problems),
         "must be 0")
    line("upstream tasks paid twice for one Idempotency-Key", len(paid_twice), "must be 0")
    line("re-submits after an answer that freed the key (allowed)", sum(repaid_after_error.values()))
    for what, count in repaid_after_error.most_common():
        line(f"    {what}", count)
    if dropped_but_known := dropped_at_submit & set(known):
        line("dropped submits the proxy still knows (unexpected but harmless)", len(dropped_but_known))
    print("faults injected by the simulators")
    for sim in ("xffuw", "fengyuan"):
        faults = upstream[sim]["faults"]
        print(f"  {sim:<9} {sum(faults.values())} of {sum(upstream[sim]['requests'].values())} requests: "
              + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    peaks = proxy.peak_kib
    line("proxy peak RSS (VmHWM, max over both processes)",
         f"{max(peaks, default=0) / 1024:.1f} MiB ({', '.join(f'{k / 1024:.1f}' for k in peaks)} MiB)")
    for number, samples in enumerate(proxy.rss_kib, 1):
        step = max(1, len(samples) // 6)
        trace = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        line(f"proxy {number} RSS (VmRSS, MiB) over its life", " ".join(f"{k / 1024:.0f}" for k in trace))
    line("proxy exit codes on SIGTERM (restart, end)", f"{exit_codes[:-1]} {exit_codes[-1]}")
    line("proxy access log statuses", dict(sorted(statuses.items())))
    line("crashes or tracebacks in the proxy's log", len(crashes), "must be 0")
    for title, items in (*must.items(), ("upstream_task_failed naming no task", soak.failed_without_ids)):
        if items:
            print(f"-- {title} (first 10 of {len(items)}):\n" + "\n".join(f"   {item}" for item in items[:10]))
    print()
    for rule, problems in must.items():
        print(f"  {'FAIL' if problems else 'PASS'}  {rule}")
    print(f"SOAK {'FAILED' if any(must.values()) else 'PASSED'}")
    return not any(must.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Soak test of the proxy: loopback, a few minutes.")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 300; --quick 40)")
    parser.add_argument("--seconds", type=float, help="seconds of load (default 120; --quick 16)")
    parser.add_argument("--quick", action="store_true", help="the short version CI runs (well under a minute)")
    parser.add_argument("--fault-rate", type=float, help="share of upstream requests given a fault (default 0.05)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shutdown-grace", type=float,
                        help="the proxy's [server] shutdown_grace (default 3; --quick 2): shorter than the "
                             "longest tasks, so the restart cuts requests that wait on them")
    parser.add_argument("--keep", action="store_true", help="keep the logs, config and store even when it passes")
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in ("clients", "seconds", "fault_rate", "shutdown_grace")
             if getattr(args, k) is not None}
    s = Settings(**{**(QUICK if args.quick else {}), **given, "keep": args.keep, "seed": args.seed})
    raise_nofile()
    interrupt_on_signals()  # SIGTERM: the finally blocks stop the children
    try:
        return asyncio.run(run(s))
    except KeyboardInterrupt:
        print("soak interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
