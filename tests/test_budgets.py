"""Clients and money (issue 3): client rpm, allowed models, key_sha256, budgets per period in
the upstreams' own units, passthrough of people's own keys, usage records and totals, and
usage surviving a restart. Everything a client sees goes through the `openai` SDK."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from conftest import CLIENT_KEY, FENGYUAN_KEYS, OTHER_CLIENT_KEY, XFFUW_KEYS, RunningProxy, Sims
from helpers import admin_get, admin_request, chat, fast_tasks, sdk_error, usage_report, wait_until, with_admin
from openai_spec import validate_model_list

from proxy.billing import period_start
from proxy.config import sha256_hex
from proxy.pool import fingerprint
from proxy.sim.fengyuan import FengyuanKey
from proxy.store import UsageRecord
from proxy.store.sqlite import SQLiteStore

K0, K1 = XFFUW_KEYS
FY_NORMAL = FENGYUAN_KEYS[0]
FY_VIP = "sk-fy-test-key-vip-6666"
FY_IMAGE = "fengyuan/image_generation"
CAROL_KEY = "sk-test-carol-5555555555"
OWN_KEY = "xf_own_key_of_dave_7777"


# ---- helpers -----------------------------------------------------------------------


def by_group(report: dict[str, Any]) -> dict[str, tuple[int, float, int]]:
    return {row["group"]: (row["requests"], row["cost"], row["failed"]) for row in report["data"]}


def expect_budget_refusal(exc: openai.APIStatusError, client: str, period: str = "") -> None:
    assert exc.status_code == 429
    assert exc.body["type"] == "insufficient_quota" and exc.body["code"] == "insufficient_quota", exc.body
    assert exc.response.headers["x-should-retry"] == "false"
    message = exc.body["message"]
    assert f"{period}budget" in message.lower() and client in message, message


# ---- client rpm and models ---------------------------------------------------------


def test_client_rpm_answers_429_and_leaves_other_clients_alone(start_proxy: Callable[..., RunningProxy],
                                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["clients"][0]["rpm"] = 3
    proxy = start_proxy(proxy_config)
    alice, bob = proxy.client(), proxy.client(OTHER_CLIENT_KEY)
    for i in range(3):
        chat(alice, f"a{i}")
    before = sims.xffuw.count("chat")
    exc = sdk_error(openai.RateLimitError, lambda: chat(alice, "a3"))
    assert exc.body["type"] == "requests" and exc.body["code"] == "rate_limit_exceeded", exc.body
    assert "alice" in exc.body["message"]
    assert 1 <= int(exc.response.headers["retry-after"]) <= 60
    assert sims.xffuw.count("chat") == before  # refused at the edge
    sdk_error(openai.RateLimitError, lambda: alice.models.list())  # every request counts, not only chats
    for i in range(5):
        chat(bob, f"b{i}")


def test_client_models_globs(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                             sims: Sims) -> None:
    proxy_config["clients"][0]["models"] = ["gpt-4o-mini", "image_*"]
    fast_tasks(proxy_config, sims)
    proxy = start_proxy(proxy_config)
    alice = proxy.client()
    chat(alice)
    chat(alice, model="xffuw/gpt-4o-mini")
    assert alice.images.generate(model=FY_IMAGE, prompt="橘猫").data[0].url
    assert alice.images.generate(model="image_generation", prompt="橘猫").data[0].url
    assert sims.fengyuan.count("invoke") == 1 and sims.xffuw.count("image") == 1
    before = len(sims.xffuw.calls), len(sims.fengyuan.calls)
    for call in (lambda: chat(alice, model="deepseek-chat"),
                 lambda: alice.images.generate(model="gpt-image-2", prompt="猫"),
                 lambda: alice.images.generate(model="dall-e-3", prompt="猫"),  # an alias of gpt-image-2
                 lambda: alice.models.retrieve("deepseek-chat")):
        exc = sdk_error(openai.PermissionDeniedError, call)
        assert exc.status_code == 403
        assert exc.body["type"] == "invalid_request_error" and exc.body["code"] == "model_not_allowed", exc.body
    assert (len(sims.xffuw.calls), len(sims.fengyuan.calls)) == before  # nothing reached an upstream
    listed = alice.models.list()
    validate_model_list(listed.model_dump())
    ids = {m.id for m in listed.data}
    assert ids == {"gpt-4o-mini", "my-chat", "xffuw/image_generation", "fengyuan/image_generation"}, ids
    # Another client without a models list sees and uses everything.
    bob = proxy.client(OTHER_CLIENT_KEY)
    assert {"deepseek-chat", "gpt-image-2", "dall-e-3"} <= {m.id for m in bob.models.list().data}
    chat(bob, model="deepseek-chat")


def test_key_sha256_clients_among_several(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                          sims: Sims) -> None:
    proxy_config["clients"].append({"name": "carol", "key_sha256": sha256_hex(CAROL_KEY).upper(), "budget": 0.5})
    proxy = start_proxy(with_admin(proxy_config))
    chat(proxy.client(CAROL_KEY), "carol")
    chat(proxy.client(), "alice")
    chat(proxy.client(OTHER_CLIENT_KEY), "bob")
    expect_budget_refusal(sdk_error(openai.RateLimitError, lambda: chat(proxy.client(CAROL_KEY), "again")), "carol")
    exc = sdk_error(openai.AuthenticationError, lambda: chat(proxy.client(sha256_hex(CAROL_KEY)), "the hash is no key"))
    assert exc.body["code"] == "invalid_api_key"
    assert by_group(usage_report(proxy)) == {"alice": (1, 0.5, 0), "bob": (1, 0.5, 0), "carol": (1, 0.5, 0)}


# ---- budgets -----------------------------------------------------------------------


def test_total_budget_in_xffuw_price(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                     sims: Sims) -> None:
    proxy_config["clients"][0]["budget"] = 1.0  # gpt-4o-mini costs 0.5 a call
    proxy_config["clients"][1]["budget"] = 1.0
    proxy = start_proxy(with_admin(proxy_config))
    alice, bob = proxy.client(), proxy.client(OTHER_CLIENT_KEY)
    # n=3 would cost 1.5: refused before anything is spent.
    expect_budget_refusal(sdk_error(openai.RateLimitError, lambda: chat(alice, "three", n=3)), "alice")
    chat(bob, "bob spends first")
    chat(alice, "one")
    chat(alice, "two")
    before = sims.xffuw.count("chat")
    exc = sdk_error(openai.RateLimitError, lambda: chat(alice, "three"))
    expect_budget_refusal(exc, "alice")
    assert "1" in exc.body["message"]  # the budget's amount
    assert sims.xffuw.count("chat") == before  # never sent upstream
    chat(bob, "bob still has half")  # alice's spending is not bob's
    expect_budget_refusal(sdk_error(openai.RateLimitError, lambda: chat(bob, "bob is out")), "bob")
    assert by_group(usage_report(proxy)) == {"alice": (2, 1.0, 0), "bob": (2, 1.0, 0)}


def test_budget_periods_daily_monthly_total(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                            sims: Sims, tmp_path: Any) -> None:
    """Earlier spending, written to the store before the proxy starts, counts only inside its period."""
    now = time.time()
    day, month = period_start("daily", now), period_start("monthly", now)
    spent_before = {  # client -> (budget_period or None, when it spent 100)
        "day_ok": ("daily", day - 60),
        "day_spent": ("daily", now - 5),
        "month_ok": ("monthly", month - 60),
        "month_spent": ("monthly", month + 1),
        "total_spent": ("total", now - 400 * 86400),
        "default_spent": (None, now - 400 * 86400),
    }
    path = str(tmp_path / "periods.sqlite3")
    store = SQLiteStore(path)
    for name, (_, at) in spent_before.items():
        store.add_usage(UsageRecord(at=at, client=name, model="gpt-4o-mini", upstream="xffuw", key="0" * 12,
                                    cost=100.0, outcome="ok", kind="chat"))
    asyncio.run(store.close())
    keys = {name: f"sk-test-{name}-0123456789" for name in spent_before}
    proxy_config["clients"] = [
        {"name": name, "key": keys[name], "budget": 1.0, **({"budget_period": period} if period else {})}
        for name, (period, _) in spent_before.items()]
    proxy_config["storage"]["path"] = path
    proxy = start_proxy(proxy_config)
    for name in ("day_ok", "month_ok"):
        chat(proxy.client(keys[name]), name)
    for name, period in (("day_spent", "daily "), ("month_spent", "monthly "), ("total_spent", ""),
                         ("default_spent", "")):
        exc = sdk_error(openai.RateLimitError, lambda name=name: chat(proxy.client(keys[name]), name))
        expect_budget_refusal(exc, name, period)
    # Today's spending does count for the daily budget.
    chat(proxy.client(keys["day_ok"]), "second half")
    expect_budget_refusal(sdk_error(openai.RateLimitError, lambda: chat(proxy.client(keys["day_ok"]), "over")),
                          "day_ok", "daily ")


def test_fengyuan_budget_in_credits(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                    sims: Sims) -> None:
    proxy_config["clients"][0]["budget"] = 50  # a Fengyuan image costs 20 credits
    fast_tasks(proxy_config, sims)
    proxy = start_proxy(with_admin(proxy_config))
    alice = proxy.client()
    # Three images at once (60) would pass it: refused before anything is spent.
    expect_budget_refusal(sdk_error(openai.RateLimitError,
                                  lambda: alice.images.generate(model=FY_IMAGE, prompt="三只猫", n=3)), "alice")
    assert sims.fengyuan.count("invoke") == 0
    for i in range(2):
        assert alice.images.generate(model=FY_IMAGE, prompt=f"猫 {i}").data[0].url
    exc = sdk_error(openai.RateLimitError, lambda: alice.images.generate(model=FY_IMAGE, prompt="猫 2"))
    expect_budget_refusal(exc, "alice")
    assert sims.fengyuan.count("invoke") == 2
    assert by_group(usage_report(proxy)) == {"alice": (2, 40.0, 0)}


def _vip_proxy(start_proxy: Callable[..., RunningProxy], config: dict[str, Any], sims: Sims) -> RunningProxy:
    sims.fengyuan.keys[FY_VIP] = FengyuanKey(credits=10_000.0, vip_level=1)
    config["providers"]["fengyuan"]["keys"] = [FY_VIP]
    fast_tasks(config, sims)
    proxy = start_proxy(with_admin(config))

    def vip_known() -> bool:
        views = admin_get(proxy, "/admin/keys").json()["data"]
        return any(v["fingerprint"] == fingerprint(FY_VIP) and v["vip_level"] == 1 for v in views)

    wait_until(vip_known, what="the VIP level read at start")
    return proxy


def test_a_vip_key_image_costs_the_discounted_price(start_proxy: Callable[..., RunningProxy],
                                                    proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy = _vip_proxy(start_proxy, proxy_config, sims)
    assert proxy.client().images.generate(model=FY_IMAGE, prompt="[instant] 猫").data[0].url
    assert proxy.client().images.generate(model=FY_IMAGE, prompt="猫").data[0].url
    assert sims.fengyuan.keys[FY_VIP].credits == 10_000.0 - 2 * 16
    assert by_group(usage_report(proxy)) == {"alice": (2, 32.0, 0)}  # 20 x vip_discount 0.8


def test_a_vip_priced_image_that_fits_the_budget_is_not_sdk_error(start_proxy: Callable[..., RunningProxy],
                                                                proxy_config: dict[str, Any], sims: Sims) -> None:
    """Only a VIP key can serve: three images cost 3 x 16 = 48, inside a budget of 50."""
    proxy_config["clients"][0]["budget"] = 50
    proxy = _vip_proxy(start_proxy, proxy_config, sims)
    alice = proxy.client()
    for i in range(3):
        assert alice.images.generate(model=FY_IMAGE, prompt=f"[instant] 猫 {i}").data[0].url
    expect_budget_refusal(sdk_error(openai.RateLimitError,
                                  lambda: alice.images.generate(model=FY_IMAGE, prompt="[instant] 猫 3")), "alice")
    assert by_group(usage_report(proxy)) == {"alice": (3, 48.0, 0)}


def test_the_upstreams_reported_cost_is_recorded(start_proxy: Callable[..., RunningProxy],
                                                 proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.fengyuan.envelope = "observed"  # this envelope reports `cost` at invoke and on the task
    proxy = start_proxy(with_admin(proxy_config))
    alice = proxy.client()
    alice.models.list()  # the catalogue says 20
    sims.fengyuan.services[0].cost_per_request = 30.0  # the upstream now charges 30
    assert alice.images.generate(model=FY_IMAGE, prompt="[instant] 猫").data[0].url
    assert sims.fengyuan.keys[FY_NORMAL].credits == 100_000.0 - 30
    assert by_group(usage_report(proxy, model=FY_IMAGE)) == {"alice": (1, 30.0, 0)}


# ---- passthrough -------------------------------------------------------------------


def test_passthrough_forwards_an_own_xffuw_key_outside_every_budget(start_proxy: Callable[..., RunningProxy],
                                                                    proxy_config: dict[str, Any],
                                                                    sims: Sims) -> None:
    sims.xffuw.keys[OWN_KEY] = 50.0
    proxy_config["auth"] = {"passthrough": True}
    proxy_config["clients"][0]["budget"] = 0.5
    proxy = start_proxy(with_admin(proxy_config))
    own = proxy.client(OWN_KEY)
    chat(own, "my own key")
    chat(own, "my own key again")
    mine = [c for c in sims.xffuw.calls if c.endpoint == "chat"]
    assert [c.key for c in mine] == [OWN_KEY, OWN_KEY]  # forwarded with that key, not a pool key
    assert sims.xffuw.keys[OWN_KEY] == 49.0
    assert sims.xffuw.keys[K0] == sims.xffuw.keys[K1] == 1_000.0
    assert {m.owned_by for m in own.models.list().data} == {"xffuw"}
    # alice's budget (one chat) is untouched by the passthrough calls.
    chat(proxy.client(), "alice")
    expect_budget_refusal(sdk_error(openai.RateLimitError, lambda: chat(proxy.client(), "alice over")), "alice")
    groups = by_group(usage_report(proxy))
    assert groups["alice"] == (1, 0.5, 0)
    assert groups[f"own-key:{fingerprint(OWN_KEY)}"] == (2, 1.0, 0)
    # An xf_ key the upstream does not know: 401, after one try with that key.
    exc = sdk_error(openai.AuthenticationError, lambda: chat(proxy.client("xf_nobody_knows_this_8888"), "x"))
    assert exc.body["code"] == "invalid_api_key"
    assert sims.xffuw.count("chat", "xf_nobody_knows_this_8888") == 1


def test_without_passthrough_an_upstream_key_is_sdk_error(start_proxy: Callable[..., RunningProxy],
                                                        proxy_config: dict[str, Any], sims: Sims) -> None:
    sims.xffuw.keys[OWN_KEY] = 50.0
    proxy = start_proxy(proxy_config)
    exc = sdk_error(openai.AuthenticationError, lambda: chat(proxy.client(OWN_KEY), "mine"))
    assert exc.status_code == 401 and exc.body["code"] == "invalid_api_key"
    assert sims.xffuw.count(key=OWN_KEY) == 0
    assert sims.xffuw.keys[OWN_KEY] == 50.0


# ---- usage records -----------------------------------------------------------------


def _rows(path: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        db.close()


def test_every_billable_call_is_recorded(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                         sims: Sims) -> None:
    fast_tasks(proxy_config, sims)
    proxy = start_proxy(with_admin(proxy_config))
    alice, bob = proxy.client(), proxy.client(OTHER_CLIENT_KEY)
    chat(alice, "one")
    chat(alice, "two")
    chat(bob, "three", model="deepseek-chat")
    image = alice.images.with_raw_response.generate(model="gpt-image-2", prompt="猫")
    image_task = image.headers["x-proxy-task-ids"]
    assert image.parse().data[0].url
    exc = sdk_error(openai.InternalServerError, lambda: alice.images.generate(model=FY_IMAGE, prompt="[fail] 猫"))
    assert exc.body["code"] == "upstream_task_failed"
    failed_task = exc.response.headers["x-proxy-task-ids"]
    usage_report(proxy)  # runs after every queued write
    rows = _rows(proxy_config["storage"]["path"])
    shape = [(r["client"], r["model"], r["upstream"], r["kind"], r["cost"], r["outcome"]) for r in rows]
    assert shape == [
        ("alice", "gpt-4o-mini", "xffuw", "chat", 0.5, "ok"),
        ("alice", "gpt-4o-mini", "xffuw", "chat", 0.5, "ok"),
        ("bob", "deepseek-chat", "xffuw", "chat", 0.2, "ok"),
        ("alice", "gpt-image-2", "xffuw", "image", 2.0, "ok"),
        ("alice", FY_IMAGE, "fengyuan", "image", 20.0, "failed"),
    ], shape
    # The key fingerprint is the key that made the call.
    chats = [c.key for c in sims.xffuw.calls if c.endpoint == "chat"]
    assert [r["key"] for r in rows[:3]] == [fingerprint(k) for k in chats]
    assert rows[3]["key"] == fingerprint(next(iter(sims.xffuw.tasks.values())).key)
    assert rows[4]["key"] == fingerprint(FY_NORMAL)
    assert [r["task_id"] for r in rows] == [None, None, None, image_task, failed_task]
    assert all(r["request_id"] and r["request_id"].startswith("req_") for r in rows)
    assert all(abs(r["at"] - time.time()) < 60 for r in rows)


def test_admin_usage_totals_filters_and_csv(start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any],
                                            sims: Sims) -> None:
    fast_tasks(proxy_config, sims)
    proxy = start_proxy(with_admin(proxy_config))
    began = time.time()
    alice, bob = proxy.client(), proxy.client(OTHER_CLIENT_KEY)
    chat(alice, "a1")
    chat(alice, "a2")
    chat(bob, "b1", model="deepseek-chat")
    chat(bob, "b2")
    assert alice.images.generate(model="flux-schnell", prompt="猫").data[0].url  # 1.0
    sdk_error(openai.InternalServerError, lambda: alice.images.generate(model=FY_IMAGE, prompt="[fail] 猫"))  # 20
    report = usage_report(proxy)
    assert report["group_by"] == "client"
    assert by_group(report) == {"alice": (4, 22.0, 1), "bob": (2, 0.7, 0)}
    assert report["total"] == {"requests": 6, "cost": 22.7, "failed": 1}
    assert by_group(usage_report(proxy, group_by="model")) == {
        "deepseek-chat": (1, 0.2, 0), "flux-schnell": (1, 1.0, 0), FY_IMAGE: (1, 20.0, 1),
        "gpt-4o-mini": (3, 1.5, 0)}
    assert by_group(usage_report(proxy, group_by="model", client="bob")) == {"deepseek-chat": (1, 0.2, 0),
                                                                      "gpt-4o-mini": (1, 0.5, 0)}
    assert by_group(usage_report(proxy, model="gpt-4o-mini")) == {"alice": (2, 1.0, 0), "bob": (1, 0.5, 0)}
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert by_group(usage_report(proxy, group_by="day")) == {today: (6, 22.7, 1)}
    assert by_group(usage_report(proxy, since=today)) == {"alice": (4, 22.0, 1), "bob": (2, 0.7, 0)}
    assert usage_report(proxy, since=time.time() + 60)["data"] == []
    assert usage_report(proxy, until=began - 60)["data"] == []
    assert by_group(usage_report(proxy, since=began - 1, until=time.time() + 1, client="alice")) == {
        "alice": (4, 22.0, 1)}
    reply = admin_get(proxy, "/admin/usage", format="csv", group_by="client")
    assert reply.headers.get_list("content-type") == ["text/csv; charset=utf-8"]  # one charset
    table = list(csv.reader(io.StringIO(reply.text)))
    assert table[0] == ["client", "requests", "cost", "failed"]
    assert {row[0]: (int(row[1]), float(row[2]), int(row[3])) for row in table[1:]} == {
        "alice": (4, 22.0, 1), "bob": (2, 0.7, 0)}
    bad = admin_request(proxy, "GET", "/admin/usage", group_by="planet")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


def test_usage_survives_a_restart_and_budgets_still_hold(start_proxy: Callable[..., RunningProxy],
                                                         proxy_config: dict[str, Any], sims: Sims) -> None:
    proxy_config["clients"][0]["budget"] = 1.5
    first = start_proxy(with_admin(proxy_config))
    chat(first.client(), "one")
    chat(first.client(), "two")
    chat(first.client(OTHER_CLIENT_KEY), "bob")
    first.server.stop()
    second = start_proxy(proxy_config)  # a new app on the same storage path
    assert second.url != first.url
    assert by_group(usage_report(second)) == {"alice": (2, 1.0, 0), "bob": (1, 0.5, 0)}
    chat(second.client(), "three")  # 1.5 of 1.5
    expect_budget_refusal(sdk_error(openai.RateLimitError, lambda: chat(second.client(), "four")), "alice")
    assert sims.xffuw.count("chat") == 4


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "[delay=0.5] hi"}],
                              "stream": True, "n": 6}),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": ["[delay=0.5] hi"] * 6, "stream": True})])
def test_a_stream_its_client_leaves_records_every_call_the_upstream_got(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims, path: str,
        body: dict[str, Any]) -> None:
    """The stream's end cancelled the calls it had not read yet: paid upstream, never recorded."""
    proxy = start_proxy(with_admin(proxy_config))
    host, port = proxy.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
            assert sock.recv(1)  # the first answer is in: the stream began; then the client is gone
    wait_until(lambda: sims.xffuw.count("chat") == 18, what="18 upstream chat calls")
    wait_until(lambda: usage_report(proxy)["total"]["requests"] == 18, timeout=10,
               what="every call the upstream got recorded")


def test_a_call_that_outlives_its_stream_stays_held_on_the_budget(
        start_proxy: Callable[..., RunningProxy], proxy_config: dict[str, Any], sims: Sims) -> None:
    """Budget 1.0, 0.5 a call: a stream of two whose client leaves after the first answer keeps its
    second call, still under way, held, so a new call is refused rather than overspending."""
    proxy_config["clients"][0]["budget"] = 1.0
    proxy = start_proxy(with_admin(proxy_config))
    host, port = proxy.url.removeprefix("http://").split(":")
    payload = json.dumps({"model": "gpt-4o-mini", "prompt": ["hi", "[delay=1.5] hi"], "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert sock.recv(1)
    time.sleep(0.3)  # the request is over, its second call still with the upstream
    sdk_error(openai.RateLimitError, lambda: chat(proxy.client(), "one more"))
    wait_until(lambda: usage_report(proxy)["total"]["requests"] == 2, what="both calls recorded")
    assert usage_report(proxy)["total"]["cost"] == 1.0
    chat(proxy.client(OTHER_CLIENT_KEY), "the hold is gone with its calls")  # another client: unaffected
