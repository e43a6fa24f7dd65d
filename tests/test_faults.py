"""Faults in the upstreams (sims.<x>.faults): the proxy holds. Transient poll failures do
not fail tasks, dead or slow upstreams give a quick 502, garbage never leaks into the
answer, the catalogue is served stale, nothing piles up, no upstream header leaks out."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims
from helpers import admin_get, free_port, post_chat, post_image, wait_until, with_admin
from openai_spec import validate_error, validate_images_response

from proxy.server import BackgroundServer
from proxy.sim import XffuwSim, create_xffuw_app

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
FY_IMAGE = "fengyuan/image_generation"


# ---- helpers --------------------------------------------------------------------------


def models(url: str) -> httpx.Response:
    return httpx.get(url + "/v1/models", headers=AUTH, timeout=10)


def upstream_error(reply: httpx.Response, sims: Sims | None = None, status: int = 502,
                   code: str = "upstream_error") -> dict[str, Any]:
    """An OpenAI-shaped upstream error whose message shows nothing of the upstream's answer."""
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    validate_error(body)
    error = body["error"]
    assert (error["type"], error["code"]) == ("server_error", code), error
    message = error["message"]
    assert message
    for leak in ("http://", "https://", "127.0.0.1", "<", "nginx", "Bad Gateway", "proc\""):
        assert leak not in message, f"{leak!r} in {message!r}"
    if sims is not None:
        for url in (sims.xffuw_url, sims.fengyuan_url):
            assert url.rsplit(":", 1)[1] not in message, message  # no upstream port either
    return error


def app_of(running: RunningProxy) -> Any:
    return running.server.server.config.app


def in_server_loop(running: RunningProxy, fn: Callable[[], Any]) -> Any:
    """Run fn inside the proxy's event loop thread (to count its asyncio tasks)."""

    async def call() -> Any:
        return fn()

    loop = running.server.loop
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=5)


# ---- transient poll failures ------------------------------------------------------------


def test_a_transient_poll_failure_does_not_fail_the_task(proxy: RunningProxy, sims: Sims) -> None:
    sims.xffuw.task_seconds = sims.fengyuan.task_seconds = 0.3
    models(proxy.url)  # the catalogue is read first
    until = time.monotonic() + 1.0
    sims.xffuw.faults.poll_fail_until = sims.fengyuan.faults.poll_fail_until = until
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda model: post_image(proxy.url, "耐心", model), ["gpt-image-2", FY_IMAGE]))
    for reply, sim in zip(replies, (sims.xffuw, sims.fengyuan), strict=True):
        assert reply.status_code == 200, reply.text
        validate_images_response(reply.json())
        polls = [c for c in sim.calls if c.endpoint in ("task", "task_list")]  # alone, or all of a key's
        assert any(c.status == 503 for c in polls), "no poll failed: the test proves nothing"
        assert polls[-1].status == 200 and polls[-1].at >= until
    assert sims.xffuw.count("image") == sims.fengyuan.count("invoke") == 1


def test_polls_failing_until_the_deadline_give_a_clean_504(start_proxy: Callable[..., RunningProxy],
                                                           proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["tasks"]["timeout"] = 1
    running = start_proxy(proxy_config)
    models(running.url)
    sims.xffuw.faults.poll_fail_until = time.monotonic() + 30
    started = time.monotonic()
    reply = post_image(running.url)
    assert time.monotonic() - started < 3
    error = upstream_error(reply, sims, 504, "upstream_timeout")
    (task_id,) = reply.headers["x-proxy-task-ids"].split(",")
    assert task_id in error["message"]


# ---- dead and slow upstreams ------------------------------------------------------------


def test_a_down_upstream_gives_502_quickly(proxy: RunningProxy, sims: Sims) -> None:
    assert models(proxy.url).status_code == 200
    sims.xffuw.faults.down = sims.fengyuan.faults.down = True
    for call in (lambda: post_chat(proxy.url), lambda: post_image(proxy.url),
                 lambda: post_image(proxy.url, model=FY_IMAGE)):
        started = time.monotonic()
        reply = call()
        assert time.monotonic() - started < 3
        upstream_error(reply, sims)
    assert sims.xffuw.count("image") == 1  # a 503 after sending is not proof: not retried on the other key


def test_a_closed_port_gives_502_quickly_and_only_for_that_upstream(start_proxy: Callable[..., RunningProxy],
                                                                    proxy_config: dict[str, Any],
                                                                    sims: Sims) -> None:
    proxy_config["providers"]["fengyuan"]["base_url"] = f"http://127.0.0.1:{free_port()}"
    running = start_proxy(proxy_config)
    started = time.monotonic()
    upstream_error(post_image(running.url, model=FY_IMAGE), sims)
    assert time.monotonic() - started < 3
    assert post_chat(running.url).status_code == 200  # xffuw is unaffected
    assert post_image(running.url).status_code == 200


def test_an_unroutable_upstream_is_bounded_by_connect_timeout(start_proxy: Callable[..., RunningProxy],
                                                             proxy_config: dict[str, Any], sims: Sims) -> None:
    # 10.255.255.1 does not answer SYNs (or has no route): either way, no hang
    proxy_config["providers"]["xffuw"].update(base_url="http://10.255.255.1/api/v1/", connect_timeout=0.5,
                                              read_timeout=0.5)
    running = start_proxy(proxy_config)
    started = time.monotonic()
    upstream_error(post_chat(running.url, model="xffuw/gpt-4o-mini"))
    # two keys may each try to connect (nothing was sent), each bounded by connect_timeout
    assert time.monotonic() - started < 2 * 0.5 + 1.0


def test_upstream_latency_beyond_read_timeout_is_502_in_bounded_time(start_proxy: Callable[..., RunningProxy],
                                                                     proxy_config: dict[str, Any],
                                                                     sims: Sims) -> None:
    read, connect, latency = 0.6, 0.5, 1.5
    proxy_config["providers"]["xffuw"].update(read_timeout=read, connect_timeout=connect)
    proxy_config["providers"]["fengyuan"].update(read_timeout=read, connect_timeout=connect)
    running = start_proxy(proxy_config)
    assert models(running.url).status_code == 200
    sims.xffuw.faults.latency = sims.fengyuan.faults.latency = latency
    sent = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        timed = list(pool.map(lambda call: (time.monotonic(), call(), time.monotonic()),
                              [lambda: post_chat(running.url), lambda: post_image(running.url),
                               lambda: post_image(running.url, model=FY_IMAGE)]))
    for started, reply, ended in timed:
        error = upstream_error(reply, sims)
        assert "timed out" in error["message"]
        assert ended - started < read + connect + 0.7, ended - started
    # The slow upstream answers in the end (the sim logs a call when it answers): each call
    # reached it once -- a read timeout after sending is no proof, so no other key was tried.
    wait_until(lambda: sims.xffuw.count("image") + sims.fengyuan.count("invoke") + sims.xffuw.count("chat") >= 3,
             sent + latency + 1.5 - time.monotonic(), "the slow answers")
    time.sleep(0.1)
    assert (sims.xffuw.count("chat"), sims.xffuw.count("image"), sims.fengyuan.count("invoke")) == (1, 1, 1)


# ---- garbage answers ----------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["error_rate", "garbage_rate"])
def test_html_and_truncated_bodies_are_502_without_leaking_them(proxy: RunningProxy, sims: Sims, fault: str) -> None:
    assert models(proxy.url).status_code == 200
    setattr(sims.xffuw.faults, fault, 1.0)
    setattr(sims.fengyuan.faults, fault, 1.0)
    for reply in (post_chat(proxy.url), post_chat(proxy.url, stream=True), post_image(proxy.url),
                  post_image(proxy.url, model=FY_IMAGE)):
        upstream_error(reply, sims)
    assert sims.xffuw.count("chat") == 2 and sims.xffuw.count("image") == 1 and sims.fengyuan.count("invoke") == 1


@pytest.mark.parametrize("fault", ["drop_rate", "drop_after_rate"])
def test_dropped_connections_are_502_after_exactly_one_attempt(proxy: RunningProxy, sims: Sims, fault: str) -> None:
    """A connection closed before an answer cannot be told apart from one closed after the
    upstream took the call: never sent twice."""
    assert models(proxy.url).status_code == 200
    setattr(sims.xffuw.faults, fault, 1.0)
    setattr(sims.fengyuan.faults, fault, 1.0)
    started = time.monotonic()
    errors = [upstream_error(reply, sims) for reply in (post_chat(proxy.url), post_image(proxy.url),
                                                         post_image(proxy.url, model=FY_IMAGE))]
    assert time.monotonic() - started < 3
    assert (sims.xffuw.count("chat"), sims.xffuw.count("image"), sims.fengyuan.count("invoke")) == (1, 1, 1)
    # closed within milliseconds: an answer saying "timed out" sends whoever reads it the wrong way
    assert not [e["message"] for e in errors if "timed out" in e["message"]]


# ---- the catalogue -------------------------------------------------------------------------


def test_catalogue_is_served_stale_while_an_upstream_is_down(start_proxy: Callable[..., RunningProxy],
                                                             proxy_config: dict[str, Any], sims: Sims) -> None:
    for name in ("xffuw", "fengyuan"):
        proxy_config["providers"][name]["catalogue_ttl"] = 0.2
    running = start_proxy(proxy_config)
    before = models(running.url).json()["data"]
    assert {m["owned_by"] for m in before} == {"xffuw", "fengyuan"}
    sims.fengyuan.faults.down = True
    sims.xffuw.faults.garbage_rate = 1.0
    time.sleep(0.3)  # both lists expired
    listed = [c for c in sims.fengyuan.calls if c.endpoint != "task"]
    reply = models(running.url)
    assert reply.status_code == 200
    assert reply.json()["data"] == before
    assert len([c for c in sims.fengyuan.calls if c.endpoint != "task"]) > len(listed), "no refresh was tried"
    retrieved = httpx.get(running.url + "/v1/models/" + FY_IMAGE, headers=AUTH)
    assert retrieved.status_code == 200 and retrieved.json()["owned_by"] == "fengyuan"
    # routing from the stale list reaches the (down) upstream: 502, not model_not_found
    upstream_error(post_image(running.url, model="product_photo"), sims)
    upstream_error(post_chat(running.url, model="deepseek-chat"), sims)


# ---- nothing piles up -----------------------------------------------------------------------


def test_no_unbounded_growth_under_faults(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                         sims: Sims) -> None:
    running = start_proxy(with_admin(proxy_config))
    assert models(running.url).status_code == 200
    assert post_image(running.url).status_code == 200  # the loops and clients every process has are up
    baseline = in_server_loop(running, lambda: len(asyncio.all_tasks()))
    sims.xffuw.faults.error_rate = 0.5
    sims.xffuw.task_seconds = 0.05
    with ThreadPoolExecutor(16) as pool, httpx.Client(headers=AUTH, timeout=30) as http:
        chats = list(pool.map(lambda i: http.post(running.url + "/v1/chat/completions", json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"#{i}"}]}), range(200)))
        images = list(pool.map(lambda i: http.post(running.url + "/v1/images/generations", json={
            "model": "gpt-image-2", "prompt": f"#{i}"}), range(20)))
    statuses = {r.status_code for r in chats + images}
    assert statuses == {200, 502}, statuses  # both outcomes happened
    for reply in chats + images:
        if reply.status_code != 200:
            validate_error(reply.json())

    keys = admin_get(running, "/admin/keys").json()["data"]
    assert {k["provider"] for k in keys} == {"xffuw", "fengyuan"}
    assert [k["in_flight"] for k in keys] == [0] * len(keys), keys
    assert sum(k["requests"] for k in keys if k["provider"] == "xffuw") >= 220
    app = app_of(running)
    assert app.state.runtime.gateway.tasks.waiting == 0
    assert app.idempotency.inflight == {}
    time.sleep(0.1)  # let finished connections' tasks end
    after = in_server_loop(running, lambda: len(asyncio.all_tasks()))
    assert after <= baseline + 1, (baseline, after)


# ---- nothing of the upstream's headers leaks -------------------------------------------------


UPSTREAM_HEADERS = [(b"server", b"nginx/1.18.0 (xffuw-edge)"), (b"x-powered-by", b"PHP/7.4.33"),
                    (b"x-upstream-node", b"xf-node-7"), (b"set-cookie", b"PHPSESSID=abc123; path=/"),
                    (b"x-ratelimit-remaining", b"upstream-quota-4141"), (b"via", b"1.1 xffuw-cdn")]


class _LoudHeaders:
    """Adds the headers a PHP host behind nginx sends to every answer of the wrapped sim."""

    def __init__(self, app: Any, base: list[str]) -> None:
        self.app, self.base = app, base

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def loud(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = [*UPSTREAM_HEADERS, (b"x-origin-url", self.base[0].encode()),
                         (b"location", (self.base[0] + "/api/v1/login.php").encode())]
                names = {k for k, _ in extra}
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names] + extra
            await send(message)

        await self.app(scope, receive, loud)


@pytest.fixture
def loud_xffuw() -> Iterator[tuple[XffuwSim, str]]:
    sim = XffuwSim({k: 1_000.0 for k in XFFUW_KEYS})
    sim.task_seconds = 0.1
    base: list[str] = [""]
    server = BackgroundServer(_LoudHeaders(create_xffuw_app(sim), base)).start()
    sim.public_base = base[0] = server.url
    yield sim, server.url
    server.stop()


def test_response_headers_never_echo_upstream_urls_or_headers(start_proxy: Callable[..., RunningProxy],
                                                              proxy_config: dict[str, Any], sims: Sims,
                                                              loud_xffuw: tuple[XffuwSim, str]) -> None:
    sim, base = loud_xffuw
    proxy_config["providers"]["xffuw"]["base_url"] = base + "/api/v1/"
    running = start_proxy(proxy_config)
    replies = [models(running.url), post_chat(running.url), post_chat(running.url, stream=True),
               post_image(running.url), post_image(running.url, model=FY_IMAGE),
               httpx.get(running.url + "/v1/models/gpt-4o-mini", headers=AUTH)]
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
    sim.faults.error_rate = 1.0
    replies += [post_chat(running.url), post_image(running.url)]  # 502 from an HTML page
    sim.faults.error_rate = 0.0
    sim.models = [m for m in sim.models if m.slug != "deepseek-chat"]
    replies.append(post_chat(running.url, model="deepseek-chat"))  # 404: the upstream no longer has it
    sim.rate_limit = 0
    replies.append(post_chat(running.url))  # 429 from the upstream's own limit, with its Retry-After
    sim.rate_limit = None
    sim.keys[XFFUW_KEYS[0]] = sim.keys[XFFUW_KEYS[1]] = 0.0
    replies.append(post_chat(running.url, model="xffuw/deepseek-chat"))  # 429 insufficient_quota (or 404)
    assert [r.status_code for r in replies[6:9]] == [502, 502, 404], [r.text for r in replies[6:]]
    assert replies[9].status_code == 429 and replies[10].status_code in (404, 429), [r.text for r in replies[9:]]

    upstream_values = [v.decode() for _, v in UPSTREAM_HEADERS] + ["PHPSESSID", "xf-node-7", "nginx"]
    hosts = [base.removeprefix("http://"), sims.fengyuan_url.removeprefix("http://")]
    for reply in replies:
        names = {k.lower() for k in reply.headers}
        assert not names & {"x-powered-by", "x-upstream-node", "set-cookie", "x-ratelimit-remaining", "via",
                            "x-origin-url", "location"}, reply.headers
        assert reply.headers.get("server") in (None, "uvicorn"), reply.headers
        for name, value in reply.headers.items():
            for leak in (*upstream_values, *hosts):
                assert leak not in value, (name, value)
        for name in names:
            assert name in ("content-type", "content-length", "date", "server", "x-request-id", "x-proxy-task-ids",
                            "x-should-retry", "retry-after", "transfer-encoding", "cache-control", "connection",
                            "x-accel-buffering"), (name, reply.headers)
    assert re.fullmatch(r"[0-9a-zA-Z_,-]+", replies[3].headers["x-proxy-task-ids"])
