"""The simulated upstreams themselves, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar

from proxy.sim import (
    FENGYUAN_DEMO_KEYS,
    XFFUW_DEMO_KEYS,
    FengyuanSim,
    XffuwSim,
    create_fengyuan_app,
    create_xffuw_app,
    parse_markers,
)
from proxy.sim.assets import PNG_BYTES

XA, XB, XBROKE = "xf_demo_alpha", "xf_demo_beta", "xf_demo_broke"
FN, FV, FBROKE = "sk-fy-demo-normal", "sk-fy-demo-vip", "sk-fy-demo-broke"
FAST = 0.05  # task_seconds in these tests


class Server:
    """uvicorn in a background thread with its own event loop, bound to a free port."""

    def __init__(self, app: Litestar) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


@dataclass
class Env:
    state: Any
    http: httpx.Client
    base: str


@pytest.fixture(scope="module")
def xf_server() -> Iterator[tuple[XffuwSim, str]]:
    state = XffuwSim()
    with Server(create_xffuw_app(state)) as base:
        state.public_base = base
        yield state, base


@pytest.fixture(scope="module")
def fy_server() -> Iterator[tuple[FengyuanSim, str]]:
    state = FengyuanSim()
    with Server(create_fengyuan_app(state)) as base:
        state.public_base = base
        yield state, base


@pytest.fixture
def xf(xf_server: tuple[XffuwSim, str]) -> Iterator[Env]:
    state, base = xf_server
    state.reset()
    state.task_seconds = FAST
    with httpx.Client(base_url=f"{base}/api/v1/", timeout=5) as http:
        yield Env(state, http, base)


@pytest.fixture(params=["documented", "observed"])
def fy(request: pytest.FixtureRequest, fy_server: tuple[FengyuanSim, str]) -> Iterator[Env]:
    state, base = fy_server
    state.reset()
    state.envelope = request.param
    state.task_seconds = FAST
    with httpx.Client(base_url=base, timeout=5) as http:
        yield Env(state, http, base)


def xh(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def fh(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def urls_in(node: Any) -> list[str]:
    """Every http(s) URL at any depth, in document order: how the proxy must search."""
    found: list[str] = []
    if isinstance(node, str) and node.startswith(("http://", "https://")):
        found.append(node)
    elif isinstance(node, dict):
        for value in node.values():
            found += urls_in(value)
    elif isinstance(node, list):
        for value in node:
            found += urls_in(value)
    return found


def progress_number(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.strip().rstrip("%"):
        return float(value.strip().rstrip("%"))
    return None


# ---- markers --------------------------------------------------------------------


def test_markers_parse_case_insensitively() -> None:
    m = parse_markers("a cat [FAIL] [Delay = 2.5] [Instant] [blocked] [never] [error]")
    assert (m.fail, m.never, m.instant, m.blocked, m.error, m.delay) == (True,) * 5 + (2.5,)
    assert m.outcome == "never"
    assert parse_markers("plain").outcome == "success" and parse_markers("x").delay is None


# ---- xffuw ----------------------------------------------------------------------


def test_xffuw_models(xf: Env) -> None:
    assert xf.http.get("models.php").json() == {"error": "invalid api key"}
    data = xf.http.get("models.php", headers=xh(XA)).json()["data"]
    by_slug = {m["slug"]: m for m in data}
    assert set(by_slug) == {
        "gpt-4o-mini",
        "deepseek-chat",
        "gpt-image-2",
        "flux-schnell",
        "kling-video",
        "suno-music",
        "image_generation",
    }
    assert by_slug["gpt-4o-mini"] == {
        "slug": "gpt-4o-mini",
        "name": "GPT-4o Mini",
        "type": "chat",
        "price": "0.5000",
        "description": by_slug["gpt-4o-mini"]["description"],
    }
    assert by_slug["kling-video"]["type"] == "video" and by_slug["suno-music"]["type"] == "audio"
    xf.state.models.pop()
    assert len(xf.http.get("models.php", headers=xh(XA)).json()["data"]) == 6


def test_xffuw_chat_minimal_answer_and_passthrough(xf: Env) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi there"},
        ],
        "temperature": 0.2,
        "max_tokens": 5,
    }
    r = xf.http.post("chat.php", json=body, headers=xh(XA))
    assert r.status_code == 200
    assert r.json() == {"choices": [{"message": {"content": "你好!我是 AI 助手。You said: hi there"}}]}
    assert xf.state.last_chat_body["temperature"] == 0.2
    assert xf.state.keys[XA] == pytest.approx(999.5)
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "text", "text": "here"},
    ]
    xf.state.chat_extra = {"usage": {"total_tokens": 3}, "id": "abc"}
    answer = xf.http.post(
        "chat.php",
        json={"model": "deepseek-chat", "messages": [{"role": "user", "content": parts}]},
        headers=xh(XA),
    ).json()
    assert answer["choices"][0]["message"]["content"].endswith("look\nhere")
    assert answer["usage"] == {"total_tokens": 3} and answer["id"] == "abc"


@pytest.mark.parametrize("status", [200, 400, 401, 402, 500])
def test_xffuw_errors_use_configured_status(xf: Env, status: int) -> None:
    xf.state.error_status = status
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    cases = [
        ({}, chat, "invalid api key"),
        (xh("xf_nope"), chat, "invalid api key"),
        (xh(XA), {**chat, "model": "nope"}, "model not found"),
        (xh(XA), {**chat, "model": "gpt-image-2"}, "model not found"),
        (xh(XBROKE), chat, "insufficient balance"),
    ]
    for headers, body, text in cases:
        r = xf.http.post("chat.php", json=body, headers=headers)
        assert (r.status_code, r.json()) == (status, {"error": text})
    assert xf.state.keys[XA] == 1000.0  # nothing was charged


def test_xffuw_bad_json_keeps_connection_usable(xf: Env) -> None:
    r = xf.http.post("chat.php", content=b"{not json", headers=xh(XA))
    assert r.json() == {"error": "invalid json body"}
    r = xf.http.post("image.php", content=b"[1, 2]", headers=xh(XA))
    assert r.json() == {"error": "invalid json body"}
    r = xf.http.post(
        "chat.php",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ok"}]},
        headers=xh(XA),
    )
    assert r.json()["choices"][0]["message"]["content"].endswith("ok")
    assert xf.http.get("nope.php", headers=xh(XA)).json() == {"error": "not found"}
    assert xf.http.get("chat.php", headers=xh(XA)).json() == {"error": "method not allowed"}
    xf.state.content_type = "text/html; charset=UTF-8"  # what a PHP host may send
    r = xf.http.get("models.php", headers=xh(XA))
    assert r.headers["content-type"] == "text/html; charset=UTF-8" and "data" in r.json()


def poll_xf(xf: Env, key: str, task_id: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = xf.http.get("task.php", params={"task_id": task_id}, headers=xh(key)).json()
        seen.append(answer)
        if answer["is_final"]:
            return seen
        time.sleep(0.02)
    return seen


def test_xffuw_async_image_task(xf: Env) -> None:
    images = ["https://example.com/ref.jpg"]
    r = xf.http.post("image.php", json={"model": "gpt-image-2", "prompt": "橘猫", "images": images}, headers=xh(XA))
    answer = r.json()
    assert answer["ok"] is True and answer["type"] == "image" and answer["task_id"].isdigit()
    assert xf.state.last_image_body["images"] == images
    assert xf.state.keys[XA] == pytest.approx(998.0)
    seen = poll_xf(xf, XA, answer["task_id"])
    assert seen[0]["state"] in ("pending", "running") and seen[0]["is_final"] is False
    assert seen[0]["result_url"] in ("", None)
    final = seen[-1]
    assert (final["is_final"], final["state"], final["media_type"]) == (True, "success", "image")
    assert final["result_url"].startswith(xf.base + "/files/")
    file = httpx.get(final["result_url"])
    assert file.headers["content-type"] == "image/png" and file.content == PNG_BYTES
    assert xf.state.count("task", XA) == len(seen)
    # Another key may not see it; the id is required.
    other = xf.http.get("task.php", params={"task_id": answer["task_id"]}, headers=xh(XB))
    assert other.json() == {"error": "task not found"}
    assert xf.http.get("task.php", headers=xh(XA)).json() == {"error": "task_id required"}


def test_xffuw_progress_forms_vary(xf: Env) -> None:
    xf.state.task_seconds = 10
    forms = set()
    for _ in range(3):
        task_id = xf.http.post("image.php", json={"model": "gpt-image-2", "prompt": "p"}, headers=xh(XA)).json()[
            "task_id"
        ]
        progress = xf.http.get("task.php", params={"task_id": task_id}, headers=xh(XA)).json()["progress"]
        forms.add("empty" if progress == "" else type(progress).__name__)
    assert forms == {"int", "str", "empty"}


def test_xffuw_instant_models_and_media(xf: Env) -> None:
    flux = xf.http.post("image.php", json={"model": "flux-schnell", "prompt": "a"}, headers=xh(XA)).json()
    assert set(flux) == {"ok", "result_url", "type"} and flux["type"] == "image"
    assert httpx.get(flux["result_url"]).content == PNG_BYTES
    marked = xf.http.post("image.php", json={"model": "kling-video", "prompt": "go [INSTANT]"}, headers=xh(XA)).json()
    file = httpx.get(marked["result_url"])
    assert marked["type"] == "video" and file.headers["content-type"] == "video/mp4"
    music = xf.http.post("image.php", json={"model": "suno-music", "prompt": "song"}, headers=xh(XA)).json()
    final = poll_xf(xf, XA, music["task_id"])[-1]
    assert final["media_type"] == "audio"
    assert httpx.get(final["result_url"]).headers["content-type"] == "audio/mpeg"
    # A chat model is not a media model.
    assert xf.http.post("image.php", json={"model": "gpt-4o-mini", "prompt": "a"}, headers=xh(XA)).json() == {
        "error": "model not found"
    }


def test_xffuw_markers(xf: Env) -> None:
    def submit(prompt: str) -> dict[str, Any]:
        return xf.http.post("image.php", json={"model": "gpt-image-2", "prompt": prompt}, headers=xh(XA)).json()

    failed = poll_xf(xf, XA, submit("x [fail]")["task_id"])[-1]
    assert (failed["is_final"], failed["state"]) == (True, "failed") and failed["fail_reason"]
    assert failed["result_url"] in ("", None)

    never = submit("x [never]")["task_id"]
    slow = submit("x [delay=0.3]")["task_id"]
    time.sleep(0.15)
    for task_id in (never, slow):
        answer = xf.http.get("task.php", params={"task_id": task_id}, headers=xh(XA)).json()
        assert answer["is_final"] is False and answer["state"] == "running"
    time.sleep(0.2)
    assert xf.http.get("task.php", params={"task_id": slow}, headers=xh(XA)).json()["state"] == "success"
    assert xf.http.get("task.php", params={"task_id": never}, headers=xh(XA)).json()["is_final"] is False

    before = xf.state.keys[XA]
    assert submit("bad [Blocked]") == {"error": "prompt blocked by content moderation"}
    assert xf.state.keys[XA] == before  # a refused prompt costs nothing
    assert submit("")["error"] == "prompt required"


def test_xffuw_rate_limit(xf: Env) -> None:
    xf.state.rate_limit = 3
    xf.state.rate_window = 0.3
    for _ in range(3):
        assert "data" in xf.http.get("models.php", headers=xh(XA)).json()
    r = xf.http.get("models.php", headers=xh(XA))
    assert (r.status_code, r.json()) == (429, {"error": "rate limit exceeded"})
    assert int(r.headers["retry-after"]) >= 1
    assert xf.state.rate_limited_count == 1
    assert "data" in xf.http.get("models.php", headers=xh(XB)).json()  # per key
    assert xf.state.count("models", XA) == 4 and xf.state.count(key=XB) == 1
    time.sleep(0.35)
    assert "data" in xf.http.get("models.php", headers=xh(XA)).json()


# ---- Fengyuan -------------------------------------------------------------------


def ok_data(env: Env, r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    body = r.json()
    if env.state.envelope == "observed":
        assert body["code"] == 0 and body["message"] == "success"
    else:
        assert body["success"] is True
    return body["data"]


def assert_error(env: Env, r: httpx.Response, doc: tuple[int, str], obs_code: int | set[int]) -> str:
    body = r.json()
    if env.state.envelope == "observed":
        codes = obs_code if isinstance(obs_code, set) else {obs_code}
        assert r.status_code == env.state.observed_error_http and body["code"] in codes
        assert body["data"] is None
    else:
        assert (r.status_code, body["success"], body["code"]) == (doc[0], False, doc[1])
    return str(body["message"])


def invoke(env: Env, key: str, prompt: str, code: str = "image_generation", **params: Any) -> httpx.Response:
    body = {"service_code": code, "params": {"prompt": prompt, **params}}
    return env.http.post("/api/service/invoke", json=body, headers=fh(key))


def task_id_of(env: Env, data: dict[str, Any]) -> str:
    return str(data["task_id"] if env.state.envelope == "observed" else data["id"])


def poll_fy(env: Env, key: str, task_id: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = ok_data(env, env.http.get(f"/api/service/task/{task_id}", headers=fh(key)))
        seen.append(data)
        if data["status"] in ("completed", "success", "failed"):
            return seen
        time.sleep(0.02)
    return seen


def test_fengyuan_service_list_needs_no_key(fy: Env) -> None:
    services = ok_data(fy, fy.http.get("/api/service/list"))["services"]
    codes = {s["service_code"]: s for s in services}
    assert set(codes) == {"image_generation", "product_photo", "image-video"}
    assert codes["image_generation"]["cost_per_request"] == 20.0
    assert codes["image-video"]["category"] == "video"
    assert {"id", "name", "description", "vip_discount", "model_endpoint"} <= set(codes["product_photo"])
    assert fy.state.count("service_list") == 1


def test_fengyuan_user_info_and_auth(fy: Env) -> None:
    info = ok_data(fy, fy.http.get("/api/user/info", headers=fh(FV)))
    assert info["credits"] == 10000 and info["vip_level"] == 1 and info["vip_expire_at"]
    assert {"id", "username"} <= set(info)
    bearer = ok_data(fy, fy.http.get("/api/user/info", headers={"Authorization": f"Bearer {FN}"}))
    assert bearer["vip_level"] == 0
    for headers in ({}, fh("sk-nope"), {"Authorization": "Bearer sk-nope"}):
        assert_error(fy, fy.http.get("/api/user/info", headers=headers), (401, "INVALID_API_KEY"), 401)


def test_fengyuan_invoke_and_poll_each_result_variant(fy: Env) -> None:
    statuses = set()
    places = set()
    for n in range(4):
        data = ok_data(fy, invoke(fy, FN, f"猫 {n}", size="2K", aspect_ratio="16:9", image_input=[]))
        assert data["status"] == "pending"
        if fy.state.envelope == "observed":
            assert data["cost"] == 20.0 and data["balance"] == 10000 - 20.0 * (n + 1)
        else:
            assert data["id"].startswith("task_") and data["created_at"].endswith("Z")
        seen = poll_fy(fy, FN, task_id_of(fy, data))
        final = seen[-1]
        statuses.add(final["status"])
        places.add(tuple(sorted(k for k in final if "url" in k or k in ("result", "output"))))
        urls = urls_in(final)
        assert len(urls) == 1, final
        file = httpx.get(urls[0])
        assert file.content == PNG_BYTES and file.headers["content-type"] == "image/png"
        assert "queue_position" in final  # unknown extras are there for the proxy to ignore
        if fy.state.envelope == "observed":
            assert all(isinstance(d["progress"], int) for d in seen)
    assert len(places) == 4  # the result lives somewhere else each time
    expected = {"completed", "success"} if fy.state.envelope == "observed" else {"completed"}
    assert statuses == expected
    assert fy.state.last_invoke_body["params"]["size"] == "2K"
    assert fy.state.keys[FN].credits == 10000 - 80


def test_fengyuan_video_and_vip_discount(fy: Env) -> None:
    data = ok_data(fy, invoke(fy, FV, "waves", "image-video", duration=5, image_url="https://x/y.jpg"))
    assert fy.state.keys[FV].credits == 10000 - 40.0  # 50 * 0.8
    final = poll_fy(fy, FV, task_id_of(fy, data))[-1]
    urls = urls_in(final)
    assert urls and all(u.endswith(".mp4") for u in urls)
    assert httpx.get(urls[0]).headers["content-type"] == "video/mp4"


def test_fengyuan_invoke_errors(fy: Env) -> None:
    r = fy.http.post("/api/service/invoke", content=b"{oops", headers=fh(FN))
    assert_error(fy, r, (400, "INVALID_PARAMS"), 400)
    r = fy.http.post("/api/service/invoke", json={"params": {}}, headers=fh(FN))
    assert_error(fy, r, (400, "INVALID_PARAMS"), 400)
    assert_error(fy, invoke(fy, FN, "x", "nope"), (404, "SERVICE_NOT_FOUND"), 404)
    message = assert_error(fy, invoke(fy, FN, "x", "product_photo"), (400, "INVALID_PARAMS"), 400)
    assert message == "product_image is required"
    assert_error(fy, invoke(fy, FN, "x [blocked]"), (400, "CONTENT_BLOCKED"), 40003)
    assert_error(fy, invoke(fy, FN, "x [error]"), (500, "AI_SERVICE_ERROR"), 40002)
    assert fy.state.keys[FN].credits == 10000  # none of these charged
    codes = set()
    for _ in range(2):
        r = invoke(fy, FBROKE, "x")
        assert_error(fy, r, (403, "INSUFFICIENT_CREDITS"), {40001, 300202})
        codes.add(r.json()["code"])
    if fy.state.envelope == "observed":
        assert codes == {40001, 300202}
    ok_data(fy, invoke(fy, FN, "x", "product_photo", product_image="https://x/p.jpg"))
    assert fy.state.keys[FN].credits == 10000 - 10


def test_fengyuan_markers(fy: Env) -> None:
    instant = ok_data(fy, invoke(fy, FN, "now [instant]"))
    done = "success" if fy.state.envelope == "observed" else "completed"
    assert instant["status"] == done and len(urls_in(instant)) == 1

    doomed = [task_id_of(fy, ok_data(fy, invoke(fy, FN, f"{n} [FAIL]"))) for n in range(3)]
    for task_id in doomed:  # the reason's key varies by task
        failed = poll_fy(fy, FN, task_id)[-1]
        assert failed["status"] == "failed" and not urls_in(failed)
        observed = fy.state.envelope == "observed"
        keys = {"error_msg", "error_message"} if observed else {"message", "fail_reason", "reason"}
        assert len(keys & set(failed)) == 1

    never = task_id_of(fy, ok_data(fy, invoke(fy, FN, "[never]")))
    slow = task_id_of(fy, ok_data(fy, invoke(fy, FN, "[delay=0.3]")))

    def status(task_id: str) -> str:
        return str(ok_data(fy, fy.http.get(f"/api/service/task/{task_id}", headers=fh(FN)))["status"])

    time.sleep(0.15)
    assert (status(never), status(slow)) == ("processing", "processing")
    time.sleep(0.2)
    assert status(slow) in ("completed", "success") and status(never) == "processing"
    # Ownership.
    r = fy.http.get(f"/api/service/task/{slow}", headers=fh(FV))
    assert_error(fy, r, (404, "TASK_NOT_FOUND"), 404)


def test_fengyuan_task_list(fy: Env) -> None:
    fy.state.task_seconds = 10
    for n in range(5):
        invoke(fy, FN, f"{n}")
    invoke(fy, FN, "done [instant]")
    invoke(fy, FV, "other key")
    rows_key = "list" if fy.state.envelope == "observed" else "tasks"
    page = ok_data(fy, fy.http.get("/api/task/list", params={"page": 2, "limit": 4}, headers=fh(FN)))
    assert page["total"] == 6 and len(page[rows_key]) == 2 and page["limit"] == 4
    clamp = ok_data(fy, fy.http.get("/api/task/list", params={"limit": 1000}, headers=fh(FN)))
    assert clamp["limit"] == 100 and len(clamp[rows_key]) == 6
    finished = ok_data(fy, fy.http.get("/api/task/list", params={"status": "completed"}, headers=fh(FN)))
    assert finished["total"] == 1
    r = fy.http.get("/api/task/list", params={"page": "x"}, headers=fh(FN))
    assert_error(fy, r, (400, "INVALID_PARAMS"), 400)


def rate_limited(env: Env, r: httpx.Response) -> bool:
    body = r.json()
    if env.state.envelope == "observed":
        return r.status_code == env.state.observed_rate_limit_http and body["code"] == 429
    return r.status_code == 429 and (body["success"], body["code"]) == (False, "RATE_LIMIT_EXCEEDED")


def test_fengyuan_rate_limit(fy: Env) -> None:
    fy.state.rate_limit_normal = 3
    fy.state.rate_limit_vip = 5
    for _ in range(3):
        ok_data(fy, fy.http.get("/api/user/info", headers=fh(FN)))
    ok_data(fy, fy.http.get("/api/service/list", headers=fh(FN)))  # needs no key: not counted
    assert rate_limited(fy, fy.http.get("/api/task/list", headers=fh(FN)))
    if fy.state.envelope == "observed":
        assert fy.state.observed_rate_limit_http == 200
        fy.state.observed_rate_limit_http = 429
    assert rate_limited(fy, invoke(fy, FN, "x"))
    assert fy.state.keys[FN].credits == 10000
    assert fy.state.rate_limited_count == 2
    for _ in range(5):  # VIP keys get the larger allowance
        ok_data(fy, fy.http.get("/api/user/info", headers=fh(FV)))
    assert rate_limited(fy, fy.http.get("/api/user/info", headers=fh(FV)))
    assert fy.state.rate_limited_count == 3
    assert fy.state.count("user_info", FV) == 6 and fy.state.count(key=FN) == 6
    fy.state.retry_after_header = True
    assert "retry-after" in fy.http.get("/api/user/info", headers=fh(FN)).headers


# ---- faults ---------------------------------------------------------------------


def test_fault_down_and_poll_fail(xf: Env) -> None:
    task_id = xf.http.post("image.php", json={"model": "gpt-image-2", "prompt": "p"}, headers=xh(XA)).json()["task_id"]
    xf.state.faults.poll_fail_until = time.monotonic() + 0.2
    r = xf.http.get("task.php", params={"task_id": task_id}, headers=xh(XA))
    assert r.status_code == 503 and "<html>" in r.text
    assert "data" in xf.http.get("models.php", headers=xh(XA)).json()  # only polls fail
    time.sleep(0.25)
    assert "state" in xf.http.get("task.php", params={"task_id": task_id}, headers=xh(XA)).json()
    xf.state.faults.down = True
    for path in ("models.php", "task.php", "nope.php"):
        assert xf.http.get(path, headers=xh(XA)).status_code == 503
    assert httpx.get(f"{xf.base}/files/a.png").status_code == 503
    assert xf.state.count("task", XA) == 3  # faulted answers are logged too


def test_fault_error_garbage_latency(fy: Env) -> None:
    fy.state.faults.error_rate = 1.0
    statuses = {fy.http.get("/api/service/list").status_code for _ in range(12)}
    assert statuses <= {500, 502, 503} and len(statuses) > 1
    assert "Bad Gateway" in fy.http.get("/api/service/list").text
    fy.state.faults.error_rate = 0.0
    fy.state.faults.garbage_rate = 1.0
    r = invoke(fy, FN, "x")
    assert r.status_code == 200
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(r.content)
    fy.state.faults.garbage_rate = 0.0
    fy.state.faults.latency = 0.2
    start = time.monotonic()
    ok_data(fy, fy.http.get("/api/service/list"))
    assert time.monotonic() - start >= 0.2


def test_fault_drop_closes_without_response(xf: Env) -> None:
    xf.state.faults.drop_rate = 1.0
    with pytest.raises(httpx.RemoteProtocolError):
        xf.http.post("image.php", json={"model": "gpt-image-2", "prompt": "p"}, headers=xh(XA))
    assert xf.state.keys[XA] == 1000.0 and xf.state.calls[-1].status == 0
    xf.state.faults.drop_rate = 0.0
    xf.state.faults.drop_after_rate = 1.0
    with pytest.raises(httpx.RemoteProtocolError):
        xf.http.post("image.php", json={"model": "gpt-image-2", "prompt": "p"}, headers=xh(XA))
    assert xf.state.keys[XA] == 998.0 and len(xf.state.tasks) == 1  # paid, answer lost
    xf.state.faults.drop_after_rate = 0.0
    assert "data" in xf.http.get("models.php", headers=xh(XA)).json()  # server is fine


def test_faults_are_reproducible(xf: Env) -> None:
    def run() -> list[int]:
        xf.state.reset()
        xf.state.faults.error_rate = 0.5
        return [xf.http.get("models.php", headers=xh(XA)).status_code for _ in range(12)]

    first = run()
    assert first == run() and 200 in first and len(set(first)) > 1


def test_async_callers_share_one_server(xf: Env) -> None:
    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=f"{xf.base}/api/v1/") as client:
            calls = [client.get("models.php", headers=xh(XA)) for _ in range(20)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(main()) == [200] * 20


def test_demo_keys_are_copied() -> None:
    a, b = FengyuanSim(), FengyuanSim()
    a.keys[FN].credits = 1
    assert b.keys[FN].credits == FENGYUAN_DEMO_KEYS[FN].credits == 10000
    x = XffuwSim()
    x.keys[XA] = 0
    assert XFFUW_DEMO_KEYS[XA] == 1000.0
