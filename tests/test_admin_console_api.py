"""The admin routes the console reads (issue 16), over real HTTP: /admin/budgets, /admin/tasks,
/admin/tasks/{id}, /admin/live; and the console's own files at /console."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import CLIENT_KEY, RunningProxy, Sims
from helpers import (
    ADMIN,
    ADMIN_KEY,
    BOB,
    admin_get,
    chat,
    error_of,
    post_image,
    task_ids,
    wait_until,
    with_admin,
)

NEW_ROUTES = ["/admin/budgets", "/admin/tasks", "/admin/tasks/task_nothing", "/admin/live"]
CHAT_PRICE = 0.5  # the xffuw simulator's gpt-4o-mini


@pytest.fixture
def admin_proxy(start_proxy: Callable[[dict[str, Any]], RunningProxy], proxy_config: dict[str, Any]) -> RunningProxy:
    return start_proxy(with_admin(proxy_config))


def test_every_new_route_needs_the_admin_key(admin_proxy: RunningProxy) -> None:
    for path in NEW_ROUTES:
        for headers in ({}, {"authorization": f"Bearer {CLIENT_KEY}"}, {"authorization": "Bearer adm-wrong-key"}):
            reply = httpx.get(admin_proxy.url + path, headers=headers, timeout=10)
            assert error_of(reply, 401)["code"] == "invalid_api_key", (path, headers)
            assert ADMIN_KEY not in reply.text


def test_budgets_show_spend_against_budget_and_the_last_hour(start_proxy: Callable[[dict[str, Any]], RunningProxy],
                                                             proxy_config: dict[str, Any]) -> None:
    proxy_config["clients"][0].update(budget=2.0, budget_period="monthly")  # alice: 4 chats
    proxy = start_proxy(with_admin(proxy_config))
    for i in range(2):
        chat(proxy.client(), f"first {i}")
    chat(proxy.client(api_key=BOB["authorization"].split()[1]), "bob once")

    def budgets() -> dict[str, dict[str, Any]]:
        return {b["client"]: b for b in admin_get(proxy.url, "/admin/budgets").json()["data"]}

    alice = wait_until(lambda: (b := budgets()["alice"])["requests_last_hour"] == 2 and b, what="alice's 2 calls")
    assert alice["budget"] == 2.0 and alice["period"] == "monthly"
    assert alice["spent"] == pytest.approx(2 * CHAT_PRICE) and alice["share"] == pytest.approx(0.5)
    assert alice["over_80"] is False and alice["cost_last_hour"] == pytest.approx(2 * CHAT_PRICE)
    month = time.gmtime()
    assert time.gmtime(alice["period_start"])[:3] == (month.tm_year, month.tm_mon, 1)
    bob = budgets()["bob"]
    assert bob["budget"] is None and bob["share"] is None and bob["over_80"] is False
    assert bob["spent"] == pytest.approx(CHAT_PRICE) and bob["requests_last_hour"] == 1
    # the same numbers as the usage report
    usage = {r["group"]: r for r in admin_get(proxy.url, "/admin/usage", group_by="client").json()["data"]}
    assert usage["alice"]["cost"] == pytest.approx(alice["spent"])

    chat(proxy.client(), "third: 75 %")
    chat(proxy.client(), "fourth: all of it")
    alice = wait_until(lambda: (b := budgets()["alice"])["requests_last_hour"] == 4 and b, what="alice's 4 calls")
    assert alice["share"] == pytest.approx(1.0) and alice["over_80"] is True


def test_tasks_waiting_then_finished_with_reasons_and_counts(admin_proxy: RunningProxy, sims: Sims) -> None:
    answers: dict[str, httpx.Response] = {}

    def draw(name: str, prompt: str) -> None:
        answers[name] = post_image(admin_proxy.url, prompt)

    slow = threading.Thread(target=draw, args=("slow", "a slow lighthouse [delay=1.5]"))
    slow.start()

    def waiting() -> list[dict[str, Any]]:
        return admin_get(admin_proxy.url, "/admin/tasks").json()["waiting"]  # type: ignore[no-any-return]

    task = wait_until(lambda: next(iter(waiting()), None), timeout=10, what="a waiting task")
    assert task["state"] in ("pending", "running") and task["client"] == "alice"
    assert task["model"] == "gpt-image-2" and task["upstream"] == "xffuw" and task["age"] >= 0
    assert isinstance(task["polls"], int)  # this process polls it
    detail = admin_get(admin_proxy.url, f"/admin/tasks/{task['id']}").json()
    assert detail["id"] == task["id"] and detail["upstream_task_id"] and detail["urls"] == []
    slow.join(timeout=20)
    assert answers["slow"].status_code == 200, answers["slow"].text
    assert task_ids(answers["slow"]) == [task["id"]]

    draw("failed", "a broken lighthouse [fail]")
    assert answers["failed"].status_code >= 400
    board = wait_until(lambda: (b := admin_get(admin_proxy.url, "/admin/tasks").json())["counts"]["failed"] == 1
                       and b, what="the failed task counted")
    assert board["waiting"] == [] and board["counts"]["succeeded"] == 1
    assert set(board["counts"]) >= {"pending", "running", "succeeded", "failed", "timeout"}
    finished = {t["state"]: t for t in board["finished"]}
    assert finished["succeeded"]["id"] == task["id"] and finished["succeeded"]["reason"] is None
    assert "simulated failure" in finished["failed"]["reason"]
    assert [t["updated"] for t in board["finished"]] == sorted((t["updated"] for t in board["finished"]), reverse=True)
    done = admin_get(admin_proxy.url, f"/admin/tasks/{task['id']}").json()
    assert done["state"] == "succeeded" and len(done["urls"]) == 1 and done["polls"] is None
    assert len(admin_get(admin_proxy.url, "/admin/tasks", limit="1").json()["finished"]) == 1


def test_unknown_task_and_a_bad_limit_are_refused_by_name(admin_proxy: RunningProxy) -> None:
    reply = httpx.get(admin_proxy.url + "/admin/tasks/task_nobody_made", headers=ADMIN, timeout=10)
    assert error_of(reply, 404)["param"] == "task_id"
    for limit in ("0", "1001", "ten", "1_0", "\u0661", " 1", "inf", "nan", "1e400", "9" * 5000):
        reply = httpx.get(admin_proxy.url + "/admin/tasks", params={"limit": limit}, headers=ADMIN, timeout=10)
        assert error_of(reply, 400)["param"] == "limit", limit


def test_live_counts_the_api_traffic_of_the_last_15_minutes(admin_proxy: RunningProxy) -> None:
    for i in range(3):
        chat(admin_proxy.client(), f"live {i}")
    refused = httpx.post(admin_proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                         json={"model": "gpt-4o-mini"}, timeout=10)
    assert refused.status_code == 400
    for _ in range(3):  # the admin API's own calls are not counted
        admin_get(admin_proxy.url, "/admin/keys")

    def live() -> dict[str, Any]:
        return admin_get(admin_proxy.url, "/admin/live").json()  # type: ignore[no-any-return]

    series = wait_until(lambda: (s := live()) and sum(b["requests"] for b in s["data"]) == 4 and s,
                        what="4 requests counted")
    assert series["bucket_seconds"] == 10 and series["span_seconds"] == 900 and series["scope"] == "process"
    assert len(series["data"]) == 90
    starts = [b["at"] for b in series["data"]]
    assert starts == sorted(starts) and starts[-1] <= time.time() < starts[-1] + 10
    assert sum(b["refused"] for b in series["data"]) == 1 and sum(b["errors"] for b in series["data"]) == 0


def test_the_console_page_and_its_files_are_served_with_a_strict_policy(admin_proxy: RunningProxy) -> None:
    page = httpx.get(admin_proxy.url + "/console", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        reply = httpx.get(f"{admin_proxy.url}/console/static/{name}", timeout=10)
        assert reply.status_code == 200 and reply.headers["content-type"] == f"{kind}; charset=utf-8", name
        again = httpx.get(f"{admin_proxy.url}/console/static/{name}", headers={"if-none-match": reply.headers["etag"]},
                          timeout=10)
        assert again.status_code == 304 and again.content == b""
    for name in ("nothing.js", "..%2F__init__.py", "%2E%2E%2Fapi%2Fadmin.py", ".hidden.js", "index.txt"):
        reply = httpx.get(f"{admin_proxy.url}/console/static/{name}", timeout=10)
        assert reply.status_code == 404, name
        assert "import" not in reply.text
